"""One decode step for a batch over the paged KV cache; on CUDA, replays captured graphs.

A step reads each row's last token from `last_tokens` (a device table with one entry per
sequence row, written by the previous step's sampling, so the host need not know it yet),
writes the token's keys and values at the row's slot, attends over the row's positions, and
leaves float32 logits and their argmax.

Eager (CPU): projections, norms and MLP run on the whole batch with HF's modules, and each row
attends over exactly its own positions with the SDPA function HF uses, so at temperature 0 the
tokens are those of ``generate()``.

Fused (CUDA, and the CPU tests that check it): fused q/k/v and gate/up GEMMs, fused RMSNorm,
residual adds in the GEMMs, one paged attention call per layer for the whole batch. On CUDA
one graph per batch bucket is captured at start (padding rows write into the padding block and
are ignored): every kernel of a step is launched at once, whatever the rows' lengths.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from triptych.engines.hf.kv_cache import KVCache, KVLayer
from triptych.engines.hf.model import LanguageModel
from triptych.engines.hf.paged_attention import PageTable, paged_attention, splits_for

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256)
"""Batch sizes graphs are captured for (those up to the largest batch, plus that batch)."""


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
    """One decoder layer's weights arranged for the fused step."""

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


def _rope_and_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    *,
    kv: KVLayer,
    heads: int,
) -> torch.Tensor:
    """Rotate the new token's queries and keys; store its keys and values in `kv` at `slots`.
    Returns the queries [B, heads, D]."""
    if qkv.device.type == "cuda":
        from triptych.engines.hf.triton_kernels import triton_rope_and_store

        return triton_rope_and_store(qkv, cos, sin, slots, kv=kv, heads=heads)
    batch, kv_heads, dim = qkv.shape[0], kv.keys.shape[2], kv.keys.shape[3]
    qk = qkv[:, : (heads + kv_heads) * dim].view(batch, heads + kv_heads, dim)
    qk = qk * cos.view(batch, 1, dim) + _rotate_half(qk) * sin.view(batch, 1, dim)
    kv.store(slots, qk[:, heads:], qkv[:, (heads + kv_heads) * dim :].view(batch, kv_heads, dim))
    return qk[:, :heads]


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The MLP's ``silu(gate) * up`` from the fused gate/up product [B, 2 I]."""
    if gate_up.device.type == "cuda":
        from triptych.models.vision_kernels import triton_silu_mul

        return triton_silu_mul(gate_up, f32_product=False)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def buckets(limit: int, candidates: tuple[int, ...]) -> list[int]:
    """The candidates below `limit`, then `limit` itself."""
    return [c for c in candidates if c < limit] + [limit]


@dataclass
class StepInputs:
    """One step's rows, as the host knows them."""

    rows: list[int]
    """Each row's sequence row (where its last token is and its next one goes)."""
    positions: list[int]
    """Rope positions of the tokens fed."""
    slots: list[int]
    """Where each token's keys and values go."""
    lengths: list[int]
    """Positions each row attends over, the new one included."""
    tables: np.ndarray
    """[rows, blocks] int32 block tables."""


class Decoder:
    """Runs decode steps over a `KVCache` for up to `max_batch` rows at once."""

    def __init__(
        self,
        model: LanguageModel,
        cache: KVCache,
        *,
        max_batch: int,
        sequence_rows: int,
        max_blocks: int,
        cuda_graphs: bool = True,
        fused: bool | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        device = model.device
        self.max_batch = max_batch
        self.padding_row = sequence_rows
        self.last_tokens = torch.zeros(sequence_rows + 1, dtype=torch.long, device=device)
        """Each sequence row's last token (the extra row takes padding rows' tokens)."""
        self._inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        """Per row: sequence row, rope position, slot, length."""
        self._tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self._logits = torch.zeros(max_batch, model.vocab_size, dtype=torch.float32, device=device)
        self._argmax = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.batch_buckets = buckets(max_batch, BATCH_BUCKETS)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.fused = device.type == "cuda" if fused is None else fused
        self._sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        self._layers: list[_FusedLayer] = []

    def capture(self) -> None:
        """Capture a graph for every batch bucket (CUDA only; a no-op otherwise)."""
        if not self.cuda_graphs:
            return
        started = time.perf_counter()
        memory = None
        side = torch.cuda.Stream(self.model.device)  # type: ignore[no-untyped-call]
        self._inputs[0].fill_(self.padding_row)
        self._inputs[3].fill_(1)
        with torch.inference_mode():
            for batch in reversed(self.batch_buckets):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._fused_step(batch)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory, capture_error_mode="thread_local"):
                    self._fused_step(batch)
                memory = graph.pool()
                self._graphs[batch] = graph
        torch.cuda.synchronize(self.model.device)
        log.info(
            "captured %d decode graphs (batch %s) in %.1f s",
            len(self._graphs),
            self.batch_buckets,
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def step(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for each row: float32 logits ``[n, vocab]`` and their argmax ``[n]``
        (views of static buffers, valid until the next step)."""
        n = len(step.rows)
        batch = self.bucket(n) if self.cuda_graphs else n
        pad = batch - n
        host = torch.tensor(
            [
                step.rows + [self.padding_row] * pad,
                step.positions + [0] * pad,
                step.slots + [0] * pad,
                step.lengths + [1] * pad,
            ],
            dtype=torch.long,
        )
        self._inputs[:, :batch].copy_(host, non_blocking=True)
        width = step.tables.shape[1]
        tables = torch.from_numpy(step.tables)
        if pad:
            tables = torch.cat([tables, tables.new_zeros(pad, width)])
        self._tables[:batch, :width].copy_(tables, non_blocking=True)
        if self.cuda_graphs:
            self._graphs[batch].replay()
        elif self.fused:
            self._fused_step(batch)
        else:
            self._eager_step(n, step)
        return self._logits[:n], self._argmax[:n]

    def bucket(self, n: int) -> int:
        """The captured batch size a step of `n` rows runs at."""
        return next(b for b in self.batch_buckets if b >= n)

    def _fused_step(self, batch: int) -> None:
        model, text = self.model, self.model.text
        layers = self._layers or self._fuse()
        rows, positions, slots, lengths = self._inputs[:, :batch]
        heads, kv_heads, dim = model.num_heads, model.kv_heads, model.head_dim
        splits = splits_for(batch, kv_heads, self._sms)
        x = text.embed_tokens(self.last_tokens[rows]).view(batch, -1)
        cos, sin = (t.reshape(batch, dim) for t in self._rope(x, positions))
        pages = PageTable(self._tables[:batch], lengths)
        for index, fused in enumerate(layers):
            qkv = torch.addmm(fused.qkv_bias, _norm(x, fused.input_norm), fused.qkv.t())
            kv = self.cache.layer(index)
            query = _rope_and_store(qkv, cos, sin, slots, kv=kv, heads=heads)
            out = paged_attention(query, kv, pages, scale=fused.scale, splits=splits)
            x = torch.addmm(x, out.reshape(batch, heads * dim), fused.o.t())
            gate_up = torch.mm(_norm(x, fused.post_norm), fused.gate_up.t())
            x = torch.addmm(x, _silu_mul(gate_up), fused.down.t())
        logits = model.model.lm_head(_norm(x, text.norm)).float()
        self._logits[:batch].copy_(logits)
        torch.argmax(logits, -1, out=self._argmax[:batch])

    def _fuse(self) -> list["_FusedLayer"]:
        """Concatenate each layer's q/k/v and gate/up weights (the modules keep views of them,
        so prefill is unchanged and no memory is duplicated)."""
        self._layers = [_FusedLayer.of(layer) for layer in self.model.text.layers]
        return self._layers

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for one new token per row; M-RoPE's three sections share the position."""
        batch = positions.shape[0]
        if self.model.vlm:
            return self.model.text.rotary_emb(x, positions.view(1, batch, 1).expand(3, batch, 1))  # type: ignore[no-any-return]
        return self.model.text.rotary_emb(x, positions.view(batch, 1))  # type: ignore[no-any-return]

    def _eager_step(self, batch: int, step: StepInputs) -> None:
        """The step with HF's modules; each row attends over exactly its own positions."""
        model, text, cache = self.model, self.model.text, self.cache
        rows, positions, slots, _ = self._inputs[:, :batch]
        spans = [
            cache.slots(table.tolist(), 0, length)
            for table, length in zip(step.tables, step.lengths, strict=True)
        ]
        x = text.embed_tokens(self.last_tokens[rows].view(batch, 1))
        cos, sin = (t.unsqueeze(1) for t in self._rope(x, positions))
        for index, layer in enumerate(text.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q = attention.q_proj(h).view(batch, 1, -1, model.head_dim).transpose(1, 2)
            k = attention.k_proj(h).view(batch, 1, -1, model.head_dim).transpose(1, 2)
            v = attention.v_proj(h).view(batch, 1, -1, model.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.layer(index).store(slots, k[:, :, 0], v[:, :, 0])
            attended = [
                sdpa_attention_forward(
                    attention,
                    q[row : row + 1],
                    cache.slots_view[index, 0, span].transpose(0, 1).unsqueeze(0),
                    cache.slots_view[index, 1, span].transpose(0, 1).unsqueeze(0),
                    None,
                    dropout=0.0,
                    scaling=_scaling(attention),
                )[0]
                for row, span in enumerate(spans)
            ]
            x = x + attention.o_proj(torch.cat(attended).reshape(batch, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = model.model.lm_head(text.norm(x)[:, 0]).float()
        self._logits[:batch].copy_(logits)
        torch.argmax(logits, -1, out=self._argmax[:batch])
