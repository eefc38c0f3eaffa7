"""Load client for an OpenAI-compatible ``/v1/chat/completions`` endpoint.

Runs on the same small machine as the server, so per-request client CPU is kept low: one
aiohttp session, the request body serialised once, and SSE lines scanned with byte checks
(only a usage chunk is JSON-parsed).

* TTFT = arrival (the socket read that delivered it) of the first ``data:`` line whose delta
  carries non-empty ``content``; a role-only or ``"content":""`` chunk does not count.
* ITL = mean gap between consecutive content-bearing chunks, pooled over all requests.
* Output tokens come from ``usage.completion_tokens``; if a server sends no usage, the
  content-chunk count stands in for it.
* Percentiles use linear interpolation between closest ranks (numpy's default).
* Warmup requests run as a separate phase before the measured phase and are excluded.
  With ``--duration`` no request starts after the deadline; in-flight ones finish and count.
* Every request sends the same prompt (and images), so server-side prefix caching may apply.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import mimetypes
import os
import platform
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

_CONTENT = re.compile(rb'"content":\s*"[^"]')  # non-empty string content in a delta
_FILLER = (
    "the quick brown fox jumps over a lazy dog while seven bright stars shine "
    "above quiet hills and rivers carry old stories toward distant towns"
)


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model: str = "default"
    concurrency: int = 1
    requests: int = 500
    warmup: int = 20
    max_tokens: int = 16
    prompt_tokens: int = 64  # approximate: the prompt has this many words
    image: tuple[str, ...] = ()
    stream: bool = True
    ignore_eos: bool = True
    duration: float | None = None  # seconds; when set, replaces ``requests``
    label: str = ""
    out: str | None = None
    timeout: float = 600.0  # per-request total timeout, seconds


@dataclass(slots=True)
class _Record:
    start: float
    end: float = 0.0
    ttft: float | None = None
    last_chunk: float = 0.0
    chunks: int = 0
    tokens: int = 0
    status: int = 0
    error: bool = False


def build_body(cfg: LoadConfig) -> bytes:
    words = _FILLER.split()
    text = " ".join(words[i % len(words)] for i in range(max(cfg.prompt_tokens, 1)))
    content: Any = text
    if cfg.image:
        content = [{"type": "text", "text": text}]
        for path in cfg.image:
            mime = mimetypes.guess_type(path)[0] or "image/png"
            b64 = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            content.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}})
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": cfg.max_tokens,
        "stream": cfg.stream,
    }
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _scan(rec: _Record, lines: list[bytes]) -> bool:
    """Account for a batch of SSE lines; return True if ``data: [DONE]`` was among them."""
    done = False
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
        elif _CONTENT.search(payload):
            now = time.perf_counter()
            if rec.ttft is None:
                rec.ttft = now - rec.start
            rec.last_chunk = now
            rec.chunks += 1
        elif b'"error":' in payload:
            rec.error = True
        if b'"completion_tokens"' in payload:
            usage = json.loads(payload).get("usage") or {}
            rec.tokens = int(usage.get("completion_tokens", 0))
    return done


_HEADERS = {"Content-Type": "application/json"}


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> _Record:
    rec = _Record(start=time.perf_counter())
    try:
        async with session.post(url, data=body, headers=_HEADERS) as resp:
            rec.status = resp.status
            if resp.status != 200:
                await resp.read()
                rec.error = True
            elif stream:
                buf, done = b"", False  # a stream cut off before ``data: [DONE]`` is an error
                async for data in resp.content.iter_any():
                    lines = (buf + data).split(b"\n")
                    buf = lines.pop()
                    done = _scan(rec, lines) or done
                done = _scan(rec, [buf]) or done
                rec.tokens = rec.tokens or rec.chunks
                rec.error = rec.error or not done
            else:
                reply = json.loads(await resp.read())
                rec.tokens = int((reply.get("usage") or {}).get("completion_tokens", 0))
                rec.error = "choices" not in reply
    except (TimeoutError, aiohttp.ClientError, ValueError):
        rec.error = True
    rec.end = time.perf_counter()
    return rec


async def _phase(
    session: aiohttp.ClientSession,
    cfg: LoadConfig,
    body: bytes,
    count: int | None,
    deadline: float | None,
) -> list[_Record]:
    url = cfg.url.rstrip("/") + "/v1/chat/completions"
    records: list[_Record] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if count is not None and issued >= count:
                return
            issued += 1
            records.append(await _one(session, url, body, cfg.stream))

    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return records


def _pct(xs: list[float], q: float) -> float:
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _summary_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    xs = sorted(v * 1000.0 for v in values)
    out: dict[str, float | None] = {f"p{q}": _pct(xs, q) for q in (50, 90, 99)}
    out["mean"] = sum(xs) / len(xs)
    return out


def utc_now() -> str:
    """The time a result was taken, as its JSON records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def report_header(benchmark: str) -> dict[str, Any]:
    """What a result file starts with: what was measured, on which machine, and when."""
    return {"benchmark": benchmark, "machine": machine_info(), "timestamp": utc_now()}


def machine_info() -> dict[str, Any]:
    def grep(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem = grep("/proc/meminfo", "MemTotal")  # "NNN kB"
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": grep("/proc/cpuinfo", "model name"),
        "mem_total_bytes": int(mem.split()[0]) * 1024 if mem else None,
    }


async def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run the warmup phase, then the measured phase; return the result dict (and ``--out`` it)."""
    body = build_body(config)
    connector = aiohttp.TCPConnector(limit=config.concurrency, keepalive_timeout=300)
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if config.warmup > 0:
            await _phase(session, config, body, config.warmup, None)
        t0 = time.perf_counter()
        if config.duration is not None:
            recs = await _phase(session, config, body, None, t0 + config.duration)
        else:
            recs = await _phase(session, config, body, config.requests, None)
        elapsed = time.perf_counter() - t0
    ok = [r for r in recs if not r.error]
    gaps = sum(r.last_chunk - r.start - r.ttft for r in ok if r.ttft is not None and r.chunks > 1)
    n_gaps = sum(r.chunks - 1 for r in ok if r.ttft is not None and r.chunks > 1)
    tokens = sum(r.tokens for r in ok)
    result: dict[str, Any] = {
        "label": config.label,
        "url": config.url,
        "concurrency": config.concurrency,
        "config": {k: v for k, v in asdict(config).items() if k != "out"},
        "requests": len(recs),
        "errors": len(recs) - len(ok),
        "status_counts": dict(sorted(Counter(str(r.status) for r in recs).items())),
        "duration_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "ttft_ms": _summary_ms([r.ttft for r in ok if r.ttft is not None]),
        "latency_ms": _summary_ms([r.end - r.start for r in ok]),
        "itl_ms": {"mean": gaps / n_gaps * 1000.0 if n_gaps else None},
        "machine": machine_info(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if config.out:
        _append_result(Path(config.out), result)
    return result


def _append_result(path: Path, result: dict[str, Any]) -> None:
    existing: list[Any] = []
    if path.exists():
        try:
            old = json.loads(path.read_text() or "[]")
            existing = old if isinstance(old, list) else [old]
        except ValueError:
            existing = []
    existing.append(result)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(existing, indent=2) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", default=LoadConfig.url)
    p.add_argument("--model", default=LoadConfig.model)
    p.add_argument("--concurrency", type=int, default=LoadConfig.concurrency)
    p.add_argument("--requests", type=int, default=LoadConfig.requests)
    p.add_argument("--warmup", type=int, default=LoadConfig.warmup)
    p.add_argument("--max-tokens", type=int, default=LoadConfig.max_tokens)
    p.add_argument("--prompt-tokens", type=int, default=LoadConfig.prompt_tokens, help="~words")
    p.add_argument("--image", action="append", default=[], help="image file to attach (repeatable)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--duration", type=float, default=None, help="seconds; replaces --requests")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None, help="JSON file holding a list; the result is appended")
    p.add_argument("--timeout", type=float, default=LoadConfig.timeout, help="per request, s")
    ns = vars(p.parse_args(argv))
    ns["image"] = tuple(ns["image"])
    if ns["concurrency"] < 1:
        p.error("--concurrency must be >= 1")
    return LoadConfig(**{f.name: ns[f.name] for f in fields(LoadConfig)})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run_load(config))
    else:
        result = uvloop.run(run_load(config))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
