"""Video input: every way a video can be bad ends at the frontend with a 400 naming the problem
and no worker sees the request; good videos come by ``data:``, ``file://`` and ``http://``;
videos and frames move the frontend's and the encoder's metrics."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.media_server import (
    MediaServer,
    assert_refused_at_the_frontend,
)
from tests.stack import Stack
from tests.test_image_input import png
from tests.test_metrics import metrics_ports, scrape, value
from tests.videos import clip, video_part
from triptych.models.video_decoder import VideoBounds, VideoRejected, probe_video

GOOD = clip(56, 56, frames=8, fps=4, seed=7)
"""2 s at 4 fps: 4 frames sampled (Qwen's 2 per second), 2 temporal patches, 8 tokens."""
BOMB_MKV = clip(16, 16, frames=3000, fps=1000, container="matroska", noise=False)
"""50 KB holding 3000 frames; Matroska declares no frame count, so only the packets tell."""
INDEXED = clip(56, 56, frames=8, fps=4, seed=7, faststart=True)
"""GOOD with its index first: cut short, it still declares 8 frames but holds fewer."""
MAX_FRAMES = 60
MAX_PIXELS = 300_000
MAX_SECONDS = 10


async def serve_video(_: web.Request) -> web.Response:
    return web.Response(body=GOOD, content_type="video/mp4")


@pytest.fixture(scope="module")
def video_server() -> Iterator[MediaServer]:
    server = MediaServer({"/clip.mp4": serve_video}, "/clip.mp4")
    yield server
    server.stop()


MEDIA_LIMITS = {
    "--max-videos": 2,
    "--max-video-bytes": 300000,
    "--max-video-frames": MAX_FRAMES,
    "--max-video-pixels": MAX_PIXELS,
    "--max-video-duration-s": MAX_SECONDS,
}
"""The frontend's limits under test (flag: value), read by the `guarded` fixture."""


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "clip.mp4").write_bytes(GOOD)
    return root


def chat(*parts: dict[str, Any], max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": max_tokens,
        "messages": [
            {"role": "user", "content": [*parts, {"type": "text", "text": "what happens?"}]}
        ],
    }


def url_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


BAD: list[tuple[str, Any, str]] = [
    ("not a video", video_part(b"hello, not a video"), "video could not be decoded"),
    ("an image", video_part(png(56, 56), "png"), "video cannot be sampled"),
    ("truncated", video_part(GOOD[: len(GOOD) // 2]), "video could not be decoded"),
    (
        "truncated, index first",
        video_part(INDEXED[: len(INDEXED) * 6 // 10]),
        "video is truncated: its container declares 8 frames",
    ),
    ("one frame", video_part(clip(56, 56, frames=1, fps=4)), "at least 2 are needed"),
    ("too long", video_part(clip(16, 16, frames=24, fps=2)), "over 10 seconds"),
    ("too many frames", video_part(clip(16, 16, frames=61, fps=30)), "61 frames (at most 60)"),
    (
        "frame-count bomb",
        video_part(clip(16, 16, frames=3000, fps=1000, noise=False)),
        "3000 frames (at most 60)",
    ),
    (
        "frame-count bomb, nothing declared",
        video_part(BOMB_MKV, "x-matroska"),
        "over 60 frames",
    ),
    (
        "frame-size bomb",
        video_part(clip(1024, 1024, frames=2, fps=2, noise=False)),
        "1048576 pixels (at most 300000)",
    ),
    ("too large", video_part(clip(480, 360, frames=24, fps=4)), "video is over 300000 bytes"),
    ("too many videos", [video_part(GOOD)] * 3, "too many videos: 3 (at most 2)"),
    ("image data URL", url_part("data:image/png;base64,AAAA"), "data:video/<type>;base64"),
    ("bad base64", url_part("data:video/mp4;base64,media_root@"), "not valid base64"),
    ("unsupported scheme", url_part("ftp://example.invalid/a.mp4"), "unsupported video URL"),
    ("loopback address", url_part("http://127.0.0.1:{port}/clip.mp4"), "video URL refused"),
    ("redirect to loopback", url_part("/to-private"), "video URL refused"),
    ("outside the root", url_part("file:///etc/passwd"), "outside the allowed directory"),
    ("in an assistant message", "ASSISTANT", "videos are only accepted in user messages"),
]


def case_body(part: Any, server: MediaServer) -> dict[str, Any]:
    if part == "ASSISTANT":
        body = chat(video_part(GOOD))
        body["messages"].insert(0, {"role": "assistant", "content": [video_part(GOOD)]})
        return body
    parts = part if isinstance(part, list) else [part]
    for p in parts:
        url = p["video_url"]["url"]
        if url.startswith("/"):
            p["video_url"]["url"] = server.url(url)
        elif "{port}" in url:
            p["video_url"]["url"] = url.format(port=server.port)
    return chat(*parts)


@pytest.mark.parametrize(("name", "part", "mentions"), BAD, ids=[b[0] for b in BAD])
def test_bad_video_is_a_400_and_reaches_no_worker(
    guarded: Stack, video_server: MediaServer, name: str, part: Any, mentions: str
) -> None:
    assert_refused_at_the_frontend(guarded, case_body(part, video_server), mentions)


def test_bombs_are_refused_without_decoding() -> None:
    """A tiny file holding thousands of frames is refused from its packets alone, fast."""
    assert len(BOMB_MKV) < 100_000
    started = time.perf_counter()
    with pytest.raises(VideoRejected, match="over 60 frames"):
        probe_video(BOMB_MKV, VideoBounds(MAX_FRAMES, MAX_PIXELS, 600))
    assert time.perf_counter() - started < 5


def test_an_indexed_video_cut_short_is_truncated() -> None:
    """Whole, the index-first MP4 is a good video; cut short, its index still counts 8."""
    bounds = VideoBounds(MAX_FRAMES, MAX_PIXELS, MAX_SECONDS)
    assert probe_video(INDEXED, bounds).frames == 8
    with pytest.raises(VideoRejected, match=r"declares 8 frames and holds [0-7]$"):
        probe_video(INDEXED[: len(INDEXED) * 6 // 10], bounds)


def test_good_videos_by_every_scheme_move_the_metrics(
    guarded: Stack, video_server: MediaServer, media_root: Path
) -> None:
    frontend = f"{guarded.url}/metrics"
    encode_port = asyncio.run(metrics_ports(guarded, "encode"))[0]
    encoder = f"http://127.0.0.1:{encode_port}/metrics"
    before, before_encoder = scrape(frontend), scrape(encoder)
    for part in (
        video_part(GOOD),
        url_part((media_root / "clip.mp4").as_uri()),
        url_part(video_server.url("/clip.mp4")),
    ):
        reply = httpx.post(f"{guarded.url}/v1/chat/completions", json=chat(part), timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] > 8  # the video's 8 tokens and the text
    after, after_encoder = scrape(frontend), scrape(encoder)

    def grew(samples: tuple[dict[Any, float], dict[Any, float]], name: str) -> float:
        return value(samples[1], name) - value(samples[0], name)

    assert grew((before, after), "triptych_frontend_videos_per_request_count") == 3
    assert grew((before, after), "triptych_frontend_videos_per_request_sum") == 3
    assert grew((before, after), "triptych_frontend_video_frames_total") == 12
    assert grew((before, after), "triptych_frontend_video_tokens_per_request_sum") == 24
    assert grew((before_encoder, after_encoder), "triptych_encode_videos_total") == 3
    assert grew((before_encoder, after_encoder), "triptych_encode_video_frames_total") == 12


def test_refused_videos_are_counted(guarded: Stack) -> None:
    frontend = f"{guarded.url}/metrics"
    before = value(scrape(frontend), "triptych_frontend_videos_rejected_total")
    reply = httpx.post(
        f"{guarded.url}/v1/chat/completions", json=chat(video_part(b"junk")), timeout=30
    )
    assert reply.status_code == 400
    assert value(scrape(frontend), "triptych_frontend_videos_rejected_total") == before + 1
