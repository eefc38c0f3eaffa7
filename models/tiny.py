"""A tiny random Qwen2.5-VL checkpoint, built from nothing, for tests and CPU development.

Real Qwen2.5-VL weights are gigabytes and CI cannot download them, so this module fabricates a
checkpoint directory that transformers loads exactly like a real one:

* ``config.json`` + ``model.safetensors``: a ~0.36M-parameter ``Qwen2_5_VLForConditionalGeneration``
  (text: hidden 64, 2 layers, 4 heads / 2 KV heads, M-RoPE sections [2, 3, 3]; vision: hidden 32,
  depth 2, one windowed and one full-attention block) with seeded random weights.
* ``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``: a byte-level BPE trained
  here on generated English with Qwen2's pre-tokenizer, the eight Qwen special tokens appended after
  the 1600 BPE tokens, and the Qwen2-VL chat template.
* ``preprocessor_config.json``: the stock Qwen2-VL image processor settings.
* ``generation_config.json``: greedy; stops at ``<|im_end|>`` or ``<|endoftext|>``.

The model says gibberish, but every code path (tokenizer, chat template, image preprocessing,
vision tower, M-RoPE, KV cache, generation) is the real one, and outputs are reproducible per seed.

    python -m triptych.models.tiny --out DIR [--seed N] [--force]

``default_model_path()`` returns a shared cached copy, generated once (safe across processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1  # bump whenever the generated files change, so cached copies get rebuilt
CHECKPOINT_NAME = "tiny-qwen2.5-vl"
TEXT_CHECKPOINT_NAME = "tiny-qwen2"
COMPLETE_MARKER = ".complete"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BPE_VOCAB_SIZE = 1600  # 256 byte symbols plus merges; the special tokens get the ids after these
INIT_STD = 0.2  # large enough that greedy decoding wanders instead of repeating one token

# Qwen2's pre-tokenizer split; transformers' Qwen2Tokenizer rebuilds this pipeline on load.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2-VL / Qwen2.5-VL chat template (also accepts OpenAI-style `image_url` parts).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or content['type'] == 'image_url'"
    " or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = {
    "name": "Alice Bob Carol Dmitri Esther Farid Grace Hiro Ingrid Jamal Kofi Lena Mateo Nadia",
    "noun": "cat dog bird horse river mountain city window garden teacher doctor engineer robot "
    "camera picture photo image video table chair kitchen forest ocean island bridge train station "
    "market library computer screen keyboard question answer problem solution story letter book "
    "paper pencil apple orange banana bread coffee tea water fire cloud storm season morning "
    "evening night system server request response token model network signal pattern shadow "
    "mirror castle village farmer student painting street building airport harbor desert valley "
    "lake beach tower museum hospital school office factory engine wheel boat ship plane bicycle "
    "car truck umbrella lamp clock door wall floor roof sky sun moon star planet flower tree leaf "
    "grass stone sand snow rain wind song music voice language number message journey memory "
    "dream idea reason detail surface",
    "adj": "small large red blue green yellow purple bright dark quiet noisy ancient modern happy "
    "sad clever careful strange simple complex warm cold heavy light narrow wide gentle rapid "
    "hidden famous empty crowded distant golden silver wooden broken shiny smooth rough tiny "
    "enormous curious",
    "verb": "sees finds builds paints writes reads carries follows watches describes counts opens "
    "closes moves sends receives explains remembers draws measures cleans repairs visits chooses "
    "compares discovers imagines protects collects organizes translates recognizes understands",
    "adv": "slowly quickly quietly carefully happily suddenly rarely often gently boldly never",
    "place": "in_the_park near_the_station under_the_bridge on_the_table inside_the_box "
    "behind_the_house across_the_river at_the_market beside_the_window over_the_hills",
    "syl": "ka lo mi ra te su vin dor bel qua zan fi ne tor ish amb ul py gre hal stro mek",
}
_TEMPLATES = (
    "The {adj} {noun} {verb} a {noun} {place}.",
    "{name} {adv} {verb} the {adj} {noun}.",
    "Why does the {noun} look so {adj}?",
    '"{name}, where is my {noun}?" asked {name}.',
    "There are {num} {noun}s and {num} {noun}s.",
    "In {year}, {name} {verb} {num} {noun}s.",
    "- {Adj} {noun}: {num}%\n- Total: {float}",
    "Describe the {noun} in this picture. It is {adj} and {adj}.",
    "def {verb}_{noun}(x, y):\n    return x + y * {num}\n",
    "User: Can you help me with the {noun}?\nAssistant: Sure! It is {adj}.",
    "The town of {coin} lies {place}, far from {coin} and {coin}.",
)


def _corpus(n_sentences: int = 1500) -> str:
    """Deterministic English-ish text: sentences, questions, dialogue, lists, numbers and code."""
    rng = random.Random(20250101)
    words = {kind: [w.replace("_", " ") for w in text.split()] for kind, text in _WORDS.items()}
    special: dict[str, Callable[[], str]] = {
        "num": lambda: str(rng.randint(0, 999)),
        "year": lambda: str(rng.randint(1900, 2030)),
        "float": lambda: f"{rng.random():.2f}",
        "Adj": lambda: rng.choice(words["adj"]).capitalize(),
        "coin": lambda: "".join(rng.choices(words["syl"], k=rng.randint(2, 3))).capitalize(),
    }

    def fill(match: re.Match[str]) -> str:
        kind = match.group(1)
        return special[kind]() if kind in special else rng.choice(words[kind])

    lines = (re.sub(r"\{(\w+)\}", fill, rng.choice(_TEMPLATES)) for _ in range(n_sentences))
    return "\n".join(lines) + "\n"


def _train_tokenizer() -> Any:
    """Train the byte-level BPE on the generated corpus, then append the special tokens."""
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = tk.decoders.ByteLevel()
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no UNK
    )
    tok.train_from_iterator(_corpus().splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE has {tok.get_vocab_size()} tokens, wanted {BPE_VOCAB_SIZE}")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def special_ids(tok: Any) -> dict[str, int]:
    """The ids of `SPECIAL_TOKENS` in a tokenizer of the tiny checkpoint (a `tokenizers`
    Tokenizer), by token."""
    return {t: int(tok.token_to_id(t)) for t in SPECIAL_TOKENS}


def _write_tokenizer(tok: Any, out: Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja; return special ids."""
    tok.save(str(out / "tokenizer.json"))
    ids = special_ids(tok)
    flags = dict.fromkeys(("lstrip", "normalized", "rstrip", "single_word"), False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {"content": t, **flags, "special": True} for t, i in ids.items()
        },
        "additional_special_tokens": [
            t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")
        ],
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return ids


def _write_preprocessor_config(out: Path) -> None:
    """The stock Qwen2-VL image processor settings: CLIP mean/std, 14px patches, 2x2 merge."""
    min_pixels, max_pixels = 3136, 12845056
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    _write_json(out / "preprocessor_config.json", config)


def _make_config(ids: dict[str, int], vocab_size: int) -> Any:
    """The model config. Text head_dim is 64 / 4 = 16, so mrope_section must sum to 8."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_window_layers": 2,
        "max_position_embeddings": 4096,
        # transformers 5 spelling of rope_scaling={"type": "mrope", ...}; it stores "default".
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
        "initializer_range": INIT_STD,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "window_size": 56,  # windows of 2x2 merged tokens: small test images still span several
        "fullatt_block_indexes": [1],  # block 0 uses window attention, block 1 full attention
        "initializer_range": INIT_STD,
    }
    return vl_config(ids, text, vision, "float32")


def vl_config(ids: dict[str, int], text: dict[str, Any], vision: dict[str, Any], dtype: str) -> Any:
    """A Qwen2.5-VL config of the given text and vision dimensions, with the family's patching
    (14-pixel patches, 2x2 merge, 2 frames per temporal patch), untied embeddings, and the tiny
    tokenizer's special tokens (`ids`, as `special_ids` returns them)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            **text,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            **vision,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype=dtype,
    )


def _write_model(config: Any, ids: dict[str, int], seed: int, out: Path) -> None:
    """Build the model with seeded random weights; save weights, config and generation config."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    _save(Qwen2_5_VLForConditionalGeneration(config), ids, out)


def _save(model: Any, ids: dict[str, int], out: Path) -> None:
    """Save weights, config and a greedy generation config (without a progress bar)."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    model.generation_config = GenerationConfig.from_dict(
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": False,
        }
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Writing shards" bar
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _write_text_model(vl_config: Any, ids: dict[str, int], seed: int, out: Path) -> None:
    """A text-only Qwen2 with the same tokenizer and text shape (for P/D of a text LLM)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = vl_config.text_config.to_dict()
    rope_theta = text.get("rope_parameters", {}).get("rope_theta", 1e6)
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
        "rms_norm_eps",
    )
    config = Qwen2Config(
        **{k: text[k] for k in keep if k in text},
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        dtype="float32",
    )
    torch.manual_seed(seed)
    _save(Qwen2ForCausalLM(config), ids, out)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _marker(seed: int, text_only: bool = False) -> str:
    fields: dict[str, Any] = {"format_version": FORMAT_VERSION, "seed": seed}
    if text_only:
        fields["text_only"] = True
    return json.dumps(fields) + "\n"


def is_complete(path: Path, seed: int = 0, text_only: bool = False) -> bool:
    """Whether ``path`` holds a finished checkpoint of this generator version and ``seed``."""
    try:
        marker = (Path(path) / COMPLETE_MARKER).read_text(encoding="utf-8")
    except OSError:
        return False
    return marker == _marker(seed, text_only)


def generate_checkpoint(out: Path, seed: int = 0, text_only: bool = False) -> Path:
    """Write the tiny checkpoint into ``out`` (created if needed, files overwritten); return it.

    Writes in place, with the ``.complete`` marker last; ``ensure_checkpoint`` wraps this in an
    atomic, concurrency-safe build.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    tok = _train_tokenizer()
    ids = _write_tokenizer(tok, out)
    config = _make_config(ids, tok.get_vocab_size())
    if text_only:
        _write_text_model(config, ids, seed, out)
    else:
        _write_preprocessor_config(out)
        _write_model(config, ids, seed, out)
    (out / COMPLETE_MARKER).write_text(_marker(seed, text_only), encoding="utf-8")
    return out


def ensure_checkpoint(
    target: Path, seed: int = 0, force: bool = False, text_only: bool = False
) -> Path:
    """Build the checkpoint at ``target`` unless a complete one is there; return ``target``.

    Safe with concurrent callers: builds are serialized by a lock file (where ``fcntl`` exists)
    and happen in a temporary directory beside ``target`` that is then renamed into place, so no
    one sees a half-written checkpoint; a caller that loses the rename race uses the winner's.
    """
    target = Path(target)
    if not force and is_complete(target, seed, text_only):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if not force and is_complete(target, seed, text_only):
            return target  # built by another process while we waited for the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            generate_checkpoint(tmp, seed, text_only)
            for p in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700; the cache may be shared
                p.chmod(0o755 if p.is_dir() else 0o644)
            _move_into_place(tmp, target, seed, force, text_only)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(
    tmp: Path, target: Path, seed: int, force: bool, text_only: bool = False
) -> None:
    """Rename ``tmp`` to ``target`` atomically, replacing an outdated (or, if ``force``, any)
    checkpoint there; a directory that is not a tiny checkpoint is never replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, target)  # atomic; fails if target exists and is not empty
            return
        except OSError as err:
            if not force and is_complete(target, seed, text_only):
                return  # another process got there first (no fcntl lock on this platform)
            if not (target / COMPLETE_MARKER).exists():
                raise FileExistsError(
                    f"{target} is not a tiny checkpoint; not replacing it"
                ) from err
        _discard(target)
    raise RuntimeError(f"could not move the generated checkpoint into {target}")


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Serialize builds of ``target`` across processes, so they do not all do the same work."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps it correct
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _discard(path: Path) -> None:
    """Move ``path`` out of the way atomically, then delete it; a missing path is fine."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _cache_root() -> Path:
    if env := os.environ.get("TRIPTYCH_CACHE_DIR"):
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists() or (repo / ".git").exists():
        return repo / ".cache"
    return Path.home() / ".cache" / "triptych"


def default_model_path() -> Path:
    """The shared tiny checkpoint (seed 0), generated on first use.

    ``$TRIPTYCH_CACHE_DIR/tiny-qwen2.5-vl`` if that is set, else ``<repo>/.cache/tiny-qwen2.5-vl``
    in a source checkout, else ``~/.cache/triptych/tiny-qwen2.5-vl``.
    """
    return ensure_checkpoint(_cache_root() / CHECKPOINT_NAME, seed=0)


def default_text_model_path() -> Path:
    """The shared tiny text-only Qwen2 (same tokenizer), generated on first use."""
    return ensure_checkpoint(_cache_root() / TEXT_CHECKPOINT_NAME, seed=0, text_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triptych.models.tiny",
        description="Write a tiny random Qwen2.5-VL checkpoint (tokenizer, config, weights).",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already complete")
    parser.add_argument(
        "--text-only",
        action="store_true",
        help="a text-only Qwen2 with the same tokenizer (for P/D)",
    )
    args = parser.parse_args(argv)
    kept = not args.force and is_complete(args.out, args.seed, args.text_only)
    path = ensure_checkpoint(args.out, seed=args.seed, force=args.force, text_only=args.text_only)
    kind = "Qwen2 (text)" if args.text_only else "Qwen2.5-VL"
    print(f"{'kept existing' if kept else 'wrote'} tiny {kind} checkpoint at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
