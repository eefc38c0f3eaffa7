"""How the grammar libraries compare on a JSON schema: compile time and per-token mask time.

For each library importable here (llguidance, xgrammar, outlines-core) and each tokenizer
given: the time to wrap the tokenizer, to compile the nested receipt schema of
`benchmarks/receipt.json` (first use, then cached), and the mean and p99 time to compute the
next-token mask while walking the valid instance stored beside it, token by token. triptych
serves with llguidance; the others are measured when installed (``pip install --no-deps`` into
a scratch folder on ``PYTHONPATH``: xgrammar needs ``apache-tvm-ffi`` and lists torch,
transformers and triton as dependencies).

    python benchmarks/grammar_libraries.py [TOKENIZER_DIR ...] [--out FILE]
"""

import argparse
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RECEIPT = json.loads((Path(__file__).parent / "receipt.json").read_text())
SCHEMA: dict[str, Any] = RECEIPT["schema"]
TEXT = json.dumps(RECEIPT["instance"], separators=(",", ":"))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _walk(
    tokens: list[int], mask: Callable[[], Any], accept: Callable[[int], None]
) -> dict[str, float]:
    """Time `mask` (the next token's allowed set) before each of `tokens`, then `accept` it:
    the mean and p99 per mask."""
    steps = []
    for token in tokens:
        _, spent = _timed(mask)
        steps.append(spent)
        accept(token)
    ordered = sorted(steps)
    return {
        "mask_mean_us": statistics.fmean(steps) * 1e6,
        "mask_p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


def bench_llguidance(path: Path, tokens: list[int], vocab: int) -> dict[str, Any]:
    import llguidance

    text = (path / "tokenizer.json").read_text()
    tokenizer, wrap = _timed(lambda: llguidance.LLTokenizer(text, n_vocab=vocab))
    options: Any = {"whitespace_flexible": False}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), overrides=options)
    masks = np.zeros((1, (vocab + 31) // 32), np.int32)

    def compile_and_first_mask() -> Any:
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        matcher.unsafe_compute_mask_ptr(masks.ctypes.data, masks.nbytes)
        return matcher

    template, compile_s = _timed(compile_and_first_mask)
    _, copy_s = _timed(template.deep_copy)
    matcher = template.deep_copy()

    def mask() -> None:
        matcher.unsafe_compute_mask_ptr(masks.ctypes.data, masks.nbytes)

    def accept(token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    walked = _walk(tokens, mask, accept)
    return {"tokenizer_s": wrap, "compile_s": compile_s, "cached_compile_s": copy_s, **walked}


def bench_xgrammar(path: Path, tokens: list[int], vocab: int) -> dict[str, Any]:
    import xgrammar
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    info, wrap = _timed(lambda: xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    compiler = xgrammar.GrammarCompiler(info)
    schema = json.dumps(SCHEMA)
    compiled, compile_s = _timed(
        lambda: compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    )
    _, cached_s = _timed(
        lambda: compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def accept(token: int) -> None:
        assert matcher.accept_token(token)

    walked = _walk(tokens, lambda: matcher.fill_next_token_bitmask(bitmask), accept)
    return {"tokenizer_s": wrap, "compile_s": compile_s, "cached_compile_s": cached_s, **walked}


def bench_outlines_core(path: Path, tokens: list[int], vocab: int) -> dict[str, Any]:
    import outlines_core
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)

    def vocabulary() -> Any:
        mapping: dict[str, list[int]] = {}
        for token in range(len(hf)):
            if token != hf.eos_token_id:
                mapping.setdefault(hf.decode([token]), []).append(token)
        return outlines_core.Vocabulary(hf.eos_token_id, mapping)

    words, wrap = _timed(vocabulary)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index, compile_s = _timed(lambda: outlines_core.Index(regex, words))
    guide = outlines_core.Guide(index)
    walked = _walk(tokens, guide.get_tokens, guide.advance)
    return {"tokenizer_s": wrap, "compile_s": compile_s, "cached_compile_s": None, **walked}


BENCHES = {
    "llguidance": bench_llguidance,
    "xgrammar": bench_xgrammar,
    "outlines_core": bench_outlines_core,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizers", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from tokenizers import Tokenizer
    from transformers import AutoConfig

    paths = args.tokenizers
    if not paths:
        from triptych.models.tiny import default_model_path

        paths = [default_model_path()]
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "schema": SCHEMA,
        "instance": TEXT,
        "tokenizers": {},
    }
    for path in paths:
        tokens = Tokenizer.from_file(str(path / "tokenizer.json")).encode(TEXT).ids
        config = AutoConfig.from_pretrained(path)
        vocab = int(getattr(config, "text_config", config).vocab_size)
        row: dict[str, Any] = {"vocab_size": vocab, "instance_tokens": len(tokens)}
        for name, bench in BENCHES.items():
            if importlib.util.find_spec(name) is None:
                row[name] = "not installed"
                continue
            try:
                row[name] = bench(path, tokens, vocab)
            except Exception as error:  # a library that fails here is a finding, not a crash
                row[name] = f"failed: {type(error).__name__}: {error}"
            print(path.name, name, row[name], flush=True)
        results["tokenizers"][path.name] = row
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
