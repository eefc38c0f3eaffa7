"""Fetching and checking images: each ``image_url`` is fetched once, decoded and measured."""

import asyncio
import hashlib
import io
import time
import warnings
from dataclasses import dataclass

from PIL import Image

from triptych.components.frontend.config import ImageLimits
from triptych.components.frontend.fetch import MediaFetcher
from triptych.components.frontend.fetch import bad_request as _bad
from triptych.observability import metrics
from triptych.protocol import ServiceError

FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


@dataclass(frozen=True)
class LoadedImage:
    """A validated image: its encoded bytes, pixel size and what its pixels are."""

    data: bytes
    width: int
    height: int
    pixels_digest: bytes = b""
    """BLAKE2b of the decoded RGB pixels (what the vision tower's processor starts from),
    whatever the URL or the (lossless) format the image came in."""


class ImageLoader:
    """Loads ``http(s)://``, ``data:image/...;base64,`` and allow-listed ``file://`` images."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.fetcher = MediaFetcher(limits)
        """Shared with the video loader: one HTTP session, one address guard."""

    async def close(self) -> None:
        """Close the HTTP session. Safe to call twice."""
        await self.fetcher.close()

    async def load_all(self, urls: list[str]) -> list[LoadedImage]:
        """Load every image concurrently; the first failure fails the request."""
        if len(urls) > self.limits.max_images:
            raise _bad(f"too many images: {len(urls)} (at most {self.limits.max_images})")
        return list(await asyncio.gather(*(self.load(url) for url in urls)))

    async def load(self, url: str) -> LoadedImage:
        """Fetch, decode and check one image."""
        data = await self.fetcher.read(url, "image", self.limits.max_bytes)
        return await asyncio.to_thread(self._check, data)

    def _check(self, data: bytes) -> LoadedImage:
        started = time.thread_time()
        if len(data) > self.limits.max_bytes:
            raise _bad(f"image is over {self.limits.max_bytes} bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    fmt = image.format
                    if width * height > self.limits.max_pixels:
                        raise _bad(
                            f"image has {width * height} pixels (at most {self.limits.max_pixels})"
                        )
                    image.load()
                    digest = pixels_digest(image)
        except ServiceError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _bad("image is too large to decode") from None
        except Exception:
            raise _bad("image could not be decoded") from None
        if fmt not in FORMATS:
            raise _bad(f"unsupported image format {fmt}")
        metrics.IMAGE_DECODE.observe(time.thread_time() - started)  # the planner's host cost
        return LoadedImage(data=data, width=width, height=height, pixels_digest=digest)


def pixels_digest(image: Image.Image) -> bytes:
    """BLAKE2b-256 of an image's size and RGB pixels, as the vision tower converts them."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.digest()
