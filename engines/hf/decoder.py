"""One decode step for a batch over the static KV pool; on CUDA, replays captured graphs.

A step embeds each running sequence's last token, writes its keys and values at the sequence's
length in its slot, attends over the slot, and returns float32 logits and their argmax. The
sequences occupy slots ``0..n-1``.

Eager (CPU, or ``--disable-cuda-graph``): projections, norms and MLP run on the whole batch at
once, and each sequence attends over exactly its own positions with the SDPA function HF
uses, so at batch 1 the arithmetic is that of ``generate()``.

CUDA graphs: one graph per (batch bucket, length bucket), captured at start, largest first, in
one shared memory pool. A step pads the batch to its bucket (padding rows write into free slots
and are ignored) and attends over the length bucket with a mask, the query heads of each KV
head grouped into one attention call (no KV repeat). Replaying a graph launches every kernel
of the step at once: no Python per layer.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from triptych.engines.hf.kv_cache import KVPool
from triptych.engines.hf.model import LanguageModel

log = logging.getLogger(__name__)

MIN_LEN_BUCKET = 256
"""The shortest attention span a graph is captured for."""
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Batch sizes graphs are captured for (those up to the pool's slots, plus the slots)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """HF's RMSNorm as one fused op."""
    weight = norm.weight
    assert isinstance(weight, torch.Tensor)
    return F.rms_norm(x, (x.shape[-1],), weight, float(norm.variance_epsilon))  # type: ignore[arg-type]


def _fused(linears: list[torch.nn.Module], part: str) -> torch.Tensor:
    """One tensor holding the `part` ("weight"/"bias") of `linears` end to end; each module's
    own parameter becomes a view of it."""
    pieces = [getattr(linear, part) for linear in linears]
    whole = torch.cat([piece.data for piece in pieces])
    start = 0
    for piece in pieces:
        piece.data = whole[start : start + piece.shape[0]]
        start += piece.shape[0]
    return whole


@dataclass(frozen=True)
class _FusedLayer:
    """One decoder layer's weights arranged for the captured step."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    scale: float

    @classmethod
    def of(cls, layer: Any) -> "_FusedLayer":
        """From one of HF's Qwen2 decoder layers."""
        attention, mlp = layer.self_attn, layer.mlp
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        qkv = _fused(projections, "weight")
        if all(p.bias is not None for p in projections):
            bias = _fused(projections, "bias")
        else:  # models without q/k/v biases (or with some): zeros where absent
            bias = torch.cat(
                [
                    p.bias.data if p.bias is not None else qkv.new_zeros(p.weight.shape[0])
                    for p in projections
                ]
            )
        return cls(
            input_norm=layer.input_layernorm,
            post_norm=layer.post_attention_layernorm,
            qkv=qkv,
            qkv_bias=bias,
            o=attention.o_proj.weight,
            gate_up=_fused([mlp.gate_proj, mlp.up_proj], "weight"),
            down=mlp.down_proj.weight,
            scale=_scaling(attention),
        )


def _scaling(attention: torch.nn.Module) -> float:
    return float(attention.scaling)  # type: ignore[arg-type]


def buckets(limit: int, candidates: list[int]) -> list[int]:
    """The candidates below `limit`, then `limit` itself."""
    return [c for c in candidates if c < limit] + [limit]


class Decoder:
    """Runs decode steps for the sequences in a `KVPool`."""

    def __init__(self, model: LanguageModel, pool: KVPool, cuda_graphs: bool = True) -> None:
        self.model = model
        self.pool = pool
        device = model.device
        slots = pool.slots
        self._inputs = torch.zeros(3, slots, dtype=torch.long, device=device)
        """Per slot: last token, rope position, KV length (where the token's KV goes)."""
        self._rows = torch.arange(slots, device=device)
        self._span = torch.arange(pool.max_len, device=device)
        self._logits = torch.zeros(slots, model.vocab_size, dtype=torch.float32, device=device)
        self._argmax = torch.zeros(slots, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.batch_buckets = buckets(slots, list(BATCH_BUCKETS))
        lengths = [MIN_LEN_BUCKET << i for i in range(32) if MIN_LEN_BUCKET << i < pool.max_len]
        self.len_buckets = buckets(pool.max_len, lengths)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._fused: list[_FusedLayer] = []

    def capture(self) -> None:
        """Capture a graph for every bucket pair (CUDA only; a no-op otherwise)."""
        if not self.cuda_graphs:
            return
        started = time.perf_counter()
        memory = None
        side = torch.cuda.Stream(self.model.device)  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            for batch in reversed(self.batch_buckets):
                for span in reversed(self.len_buckets):
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            self._graph_step(batch, span)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=memory, capture_error_mode="thread_local"):
                        self._graph_step(batch, span)
                    memory = graph.pool()
                    self._graphs[(batch, span)] = graph
        torch.cuda.synchronize(self.model.device)
        log.info(
            "captured %d decode graphs (batch %s x span %s) in %.1f s",
            len(self._graphs),
            self.batch_buckets,
            self.len_buckets,
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def step(
        self, tokens: list[int], positions: list[int], lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for each of the first ``len(tokens)`` slots.

        `positions` are rope positions, `lengths` the tokens already in each slot. Returns
        float32 logits ``[n, vocab]`` and their argmax ``[n]`` (views of static buffers, valid
        until the next step).
        """
        n = len(tokens)
        top = max(lengths) + 1
        if top > self.pool.max_len:
            raise ValueError(f"a sequence outgrew its slot ({top} > {self.pool.max_len})")
        if self.cuda_graphs:
            batch, span = self.padded(tokens, positions, lengths)
            self._graphs[(batch, span)].replay()
        else:
            host = torch.tensor([tokens, positions, lengths], dtype=torch.long)
            self._inputs[:, :n].copy_(host)
            self._eager_step(lengths)
        return self._logits[:n], self._argmax[:n]

    def padded(
        self, tokens: list[int], positions: list[int], lengths: list[int]
    ) -> tuple[int, int]:
        """Load a step's inputs padded to its buckets; returns (batch, span) of its graph."""
        batch = next(b for b in self.batch_buckets if b >= len(tokens))
        span = next(s for s in self.len_buckets if s > max(lengths))
        pad = [0] * (batch - len(tokens))
        host = torch.tensor([tokens + pad, positions + pad, lengths + pad], dtype=torch.long)
        self._inputs[:, :batch].copy_(host, non_blocking=True)
        return batch, span

    def _graph_step(self, batch: int, span: int) -> None:
        """The step as captured: fused projections, fused norms, residual adds inside the
        GEMMs, and each KV head's query heads attending together over the padded span."""
        model, text = self.model, self.model.text
        layers = self._fused or self._fuse()
        tokens, positions, lengths = self._inputs[:, :batch]
        rows = self._rows[:batch]
        heads, kv_heads, dim = model.num_heads, model.kv_heads, model.head_dim
        mask = (self._span[:span].view(1, span) <= lengths.view(batch, 1)).view(batch, 1, 1, span)
        x = text.embed_tokens(tokens).view(batch, -1)
        cos, sin = (t.view(batch, 1, dim) for t in self._rope(x, positions))
        for index, fused in enumerate(layers):
            qkv = torch.addmm(fused.qkv_bias, _norm(x, fused.input_norm), fused.qkv.t())
            qk = qkv[:, : (heads + kv_heads) * dim].view(batch, heads + kv_heads, dim)
            qk = qk * cos + _rotate_half(qk) * sin
            self.pool.keys(index)[rows, :, lengths] = qk[:, heads:]
            self.pool.values(index)[rows, :, lengths] = qkv[:, (heads + kv_heads) * dim :].view(
                batch, kv_heads, dim
            )
            out = F.scaled_dot_product_attention(
                qk[:, :heads].reshape(batch, kv_heads, heads // kv_heads, dim),
                self.pool.keys(index)[:batch, :, :span],
                self.pool.values(index)[:batch, :, :span],
                attn_mask=mask,
                scale=fused.scale,
            )
            x = torch.addmm(x, out.reshape(batch, heads * dim), fused.o.t())
            gate, up = torch.mm(_norm(x, fused.post_norm), fused.gate_up.t()).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, fused.down.t())
        logits = model.model.lm_head(_norm(x, text.norm)).float()
        self._logits[:batch].copy_(logits)
        self._argmax[:batch].copy_(logits.argmax(-1))

    def _fuse(self) -> list["_FusedLayer"]:
        """Concatenate each layer's q/k/v and gate/up weights (the modules keep views of them,
        so prefill is unchanged and no memory is duplicated)."""
        self._fused = [_FusedLayer.of(layer) for layer in self.model.text.layers]
        return self._fused

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for one new token per row; M-RoPE's three sections share the position."""
        batch = positions.shape[0]
        if self.model.vlm:
            return self.model.text.rotary_emb(x, positions.view(1, batch, 1).expand(3, batch, 1))  # type: ignore[no-any-return]
        return self.model.text.rotary_emb(x, positions.view(batch, 1))  # type: ignore[no-any-return]

    def _eager_step(self, lengths: list[int]) -> None:
        """The step with HF's modules; each row attends over exactly its own positions."""
        model, text, batch = self.model, self.model.text, len(lengths)
        tokens, positions, written = self._inputs[:, :batch]
        rows = self._rows[:batch]
        x = text.embed_tokens(tokens.view(batch, 1))
        cos, sin = (t.unsqueeze(1) for t in self._rope(x, positions))
        for index, layer in enumerate(text.layers):
            attention = layer.self_attn
            keys, values = self.pool.keys(index), self.pool.values(index)
            h = layer.input_layernorm(x)
            q = attention.q_proj(h).view(batch, 1, -1, model.head_dim).transpose(1, 2)
            k = attention.k_proj(h).view(batch, 1, -1, model.head_dim).transpose(1, 2)
            v = attention.v_proj(h).view(batch, 1, -1, model.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[rows, :, written] = k[:, :, 0]
            values[rows, :, written] = v[:, :, 0]
            attended = [
                sdpa_attention_forward(
                    attention,
                    q[row : row + 1],
                    keys[row : row + 1, :, : length + 1],
                    values[row : row + 1, :, : length + 1],
                    None,
                    dropout=0.0,
                    scaling=_scaling(attention),
                )[0]
                for row, length in enumerate(lengths)
            ]
            x = x + attention.o_proj(torch.cat(attended).reshape(batch, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = model.model.lm_head(text.norm(x)[:, 0]).float()
        self._logits[:batch].copy_(logits)
        self._argmax[:batch].copy_(logits.argmax(-1))
