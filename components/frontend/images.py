"""Fetching and checking images: each ``image_url`` is fetched once, decoded and measured."""

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp
from PIL import Image
from yarl import URL

from triptych.components.frontend.address_guard import (
    AddressGuard,
    BlockedAddress,
    GuardedResolver,
)
from triptych.components.frontend.config import ImageLimits
from triptych.protocol import ErrorCode, ServiceError

FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


@dataclass(frozen=True)
class LoadedImage:
    """A validated image: its encoded bytes and pixel size."""

    data: bytes
    width: int
    height: int


def _bad(message: str) -> ServiceError:
    return ServiceError(ErrorCode.BAD_REQUEST, message)


class ImageLoader:
    """Loads ``http(s)://``, ``data:image/...;base64,`` and allow-listed ``file://`` images."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.guard = AddressGuard(limits.allowed_hosts, limits.allowed_networks)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP session. Safe to call twice."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def load_all(self, urls: list[str]) -> list[LoadedImage]:
        """Load every image concurrently; the first failure fails the request."""
        if len(urls) > self.limits.max_images:
            raise _bad(f"too many images: {len(urls)} (at most {self.limits.max_images})")
        return list(await asyncio.gather(*(self.load(url) for url in urls)))

    async def load(self, url: str) -> LoadedImage:
        """Fetch, decode and check one image."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._from_data_url(url)
        elif scheme in ("http", "https"):
            data = await self._fetch(url)
        elif scheme == "file":
            data = self._from_file(url)
        else:
            raise _bad(f"unsupported image URL scheme '{scheme or url[:16]}'")
        return await asyncio.to_thread(self._check, data)

    def _from_data_url(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise _bad("data URLs must look like data:image/<type>;base64,<data>")
        if len(payload) > self.limits.max_bytes * 4 // 3 + 4:
            raise _bad(f"image is over {self.limits.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("image data URL is not valid base64") from None

    async def _fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.limits.fetch_timeout_s):
                return await self._follow(url)
        except TimeoutError:
            raise _bad(f"image fetch took over {self.limits.fetch_timeout_s:g}s") from None
        except BlockedAddress as error:
            raise _bad(f"image URL refused: {error}") from None
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.__cause__, BlockedAddress) or isinstance(
                getattr(error, "os_error", None), BlockedAddress
            ):
                raise _bad(f"image URL refused: {error.__cause__ or error.os_error}") from None
            raise _bad("image URL host could not be resolved") from None
        except aiohttp.ClientError as error:
            raise _bad(f"image URL could not be fetched: {type(error).__name__}") from None

    async def _follow(self, url: str) -> bytes:
        """GET with redirects followed by hand, each hop through the address guard."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.guard))
            )
        for _ in range(self.limits.max_redirects + 1):
            target = URL(url)
            if target.scheme not in ("http", "https") or not target.host:
                raise _bad("image URLs may only redirect to http(s) URLs")
            self.guard.check_url_host(target.host)
            async with self._session.get(target, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location", "")
                    url = str(target.join(URL(location)))
                    continue
                if response.status != 200:
                    raise _bad(f"image URL answered HTTP {response.status}")
                return await self._read_limited(response)
        raise _bad("image URL redirects too many times")

    async def _read_limited(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self.limits.max_bytes:
            raise _bad(f"image is over {self.limits.max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.limits.max_bytes:
                raise _bad(f"image is over {self.limits.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _from_file(self, url: str) -> bytes:
        if self.limits.file_root is None:
            raise _bad("file:// image URLs are disabled on this server")
        root = Path(self.limits.file_root).resolve()
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(root):
            raise _bad("file:// image URL is outside the allowed directory")
        try:
            if path.stat().st_size > self.limits.max_bytes:
                raise _bad(f"image is over {self.limits.max_bytes} bytes")
            return path.read_bytes()
        except OSError:
            raise _bad("file:// image could not be read") from None

    def _check(self, data: bytes) -> LoadedImage:
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
        except ServiceError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _bad("image is too large to decode") from None
        except Exception:
            raise _bad("image could not be decoded") from None
        if fmt not in FORMATS:
            raise _bad(f"unsupported image format {fmt}")
        return LoadedImage(data=data, width=width, height=height)
