"""Reading video containers with PyAV (FFmpeg): what a video holds, and the frames asked for.

Every limit is checked before the work it bounds. `probe_video` reads the container header
(frame size, declared frame count and duration) and then only demuxes packets to count the
frames: nothing is decoded, so a small file that declares or holds a huge number of frames, or
frames of a huge size, is refused after reading its headers and packet table. Decoding
(`check_frames`, `read_frames`) stops at the last frame asked for and refuses a frame larger
than the limit the moment it appears (a stream may change size midway).
"""

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


class VideoRejected(ValueError):
    """The video is unreadable or over a limit; the message is meant for the client."""


@dataclass(frozen=True)
class VideoProbe:
    """What a video's container says and holds, found without decoding a frame."""

    width: int
    height: int
    frames: int
    """Frames in the first video stream (its packets, counted)."""
    fps: float
    """Average frame rate."""
    duration_s: float
    """Frames / fps, as transformers computes it."""


@dataclass(frozen=True)
class VideoBounds:
    """Limits a video must stay within."""

    max_frames: int
    max_pixels: int
    """Pixels of one frame."""
    max_duration_s: float


def _open(data: bytes) -> "av.container.InputContainer":
    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception:  # FFmpeg's errors, or anything the probe trips on
        raise VideoRejected("video could not be decoded") from None


def probe_video(data: bytes, bounds: VideoBounds) -> VideoProbe:
    """Size, frame count and rate of the first video stream, within `bounds`."""
    with _open(data) as container:
        if not container.streams.video:
            raise VideoRejected("the file has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width < 1 or height < 1:
            raise VideoRejected("video could not be decoded")
        _check_pixels(width, height, bounds)
        declared = int(stream.frames or 0)
        if declared > bounds.max_frames:
            raise VideoRejected(f"video has {declared} frames (at most {bounds.max_frames})")
        time_base = stream.time_base or Fraction(1, 1)
        if stream.duration is not None:
            _check_duration(float(stream.duration * time_base), bounds)
        elif container.duration is not None:
            _check_duration(container.duration / av.time_base, bounds)
        start = stream.start_time or 0
        frames = 0
        try:
            for packet in container.demux(stream):
                if not packet.size:  # the demuxer's closing empty packet
                    continue
                frames += 1
                if frames > bounds.max_frames:
                    raise VideoRejected(f"video has over {bounds.max_frames} frames")
                if packet.pts is not None:
                    _check_duration(float((packet.pts - start) * time_base), bounds)
        except av.FFmpegError:
            raise VideoRejected("video could not be decoded") from None
        rate = stream.average_rate or stream.guessed_rate
        if frames == 0:
            raise VideoRejected("video has no frames")
        if frames < declared:
            raise VideoRejected(
                f"video is truncated: its container declares {declared} frames and holds {frames}"
            )
        if not rate or rate <= 0:
            raise VideoRejected("video has no frame rate")
        fps = float(rate)
        _check_duration(frames / fps, bounds)
        return VideoProbe(width, height, frames, fps, frames / fps)


def check_frames(data: bytes, indices: Sequence[int], bounds: VideoBounds) -> None:
    """Decode up to the last of `indices`, checking every frame's size; VideoRejected when the
    stream ends before it (a truncated or corrupt file)."""
    for _ in _decoded(data, indices, bounds):
        pass


def read_frames(data: bytes, indices: Sequence[int], bounds: VideoBounds) -> Iterator[np.ndarray]:
    """The frames at `indices`, in order, as RGB arrays [height, width, 3] (uint8), decoded
    one at a time."""
    for frame in _decoded(data, indices, bounds):
        yield frame.to_ndarray(format="rgb24")


def _decoded(data: bytes, indices: Sequence[int], bounds: VideoBounds) -> Iterator["av.VideoFrame"]:
    wanted = set(indices)
    if not wanted or min(wanted) < 0:
        raise VideoRejected("no frames asked for")
    last = max(wanted)
    found = 0
    size: tuple[int, int] | None = None
    with _open(data) as container:
        if not container.streams.video:
            raise VideoRejected("the file has no video stream")
        try:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                _check_pixels(frame.width, frame.height, bounds)
                if index in wanted:
                    if size is not None and size != (frame.width, frame.height):
                        raise VideoRejected("video changes its frame size midway")
                    size = (frame.width, frame.height)
                    found += 1
                    yield frame
                if index >= last:
                    break
        except av.FFmpegError:
            raise VideoRejected("video could not be decoded") from None
    if found < len(wanted):
        raise VideoRejected(
            f"video is truncated or corrupt: {found} of the {len(wanted)} frames sampled "
            "could be decoded"
        )


def _check_pixels(width: int, height: int, bounds: VideoBounds) -> None:
    if width * height > bounds.max_pixels:
        raise VideoRejected(
            f"video frames have {width * height} pixels (at most {bounds.max_pixels})"
        )


def _check_duration(seconds: float, bounds: VideoBounds) -> None:
    if seconds > bounds.max_duration_s:
        raise VideoRejected(
            f"video is over {bounds.max_duration_s:g} seconds long ({seconds:.1f} s)"
        )
