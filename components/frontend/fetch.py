"""Fetching media bytes: ``http(s)://`` through the SSRF guard, ``data:`` and ``file://``.

Images and videos come the same way; only the accepted ``data:`` type, the byte limit and
the word in the messages (`kind`) differ.
"""

import asyncio
import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp
from yarl import URL

from triptych.components.frontend.address_guard import (
    AddressGuard,
    BlockedAddress,
    GuardedResolver,
)
from triptych.components.frontend.config import ImageLimits
from triptych.protocol import ErrorCode, ServiceError


def bad_request(message: str) -> ServiceError:
    """A 400 naming what is wrong with the input."""
    return ServiceError(ErrorCode.BAD_REQUEST, message)


class MediaFetcher:
    """Reads a media URL's bytes, at most `max_bytes` of them, and nothing the guard refuses.

    The fetch settings (timeout, redirects, allow-lists, ``file://`` root) are the image
    flags'; they apply to videos too.
    """

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.guard = AddressGuard(limits.allowed_hosts, limits.allowed_networks)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP session. Safe to call twice."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def read(self, url: str, kind: str, max_bytes: int) -> bytes:
        """The bytes behind `url`: a `kind` ("image" or "video") of at most `max_bytes`."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._from_data_url(url, kind, max_bytes)
        if scheme in ("http", "https"):
            return await self._fetch(url, kind, max_bytes)
        if scheme == "file":
            return self._from_file(url, kind, max_bytes)
        raise bad_request(f"unsupported {kind} URL scheme '{scheme or url[:16]}'")

    def _from_data_url(self, url: str, kind: str, max_bytes: int) -> bytes:
        header, _, payload = url.partition(",")
        if not header.startswith(f"data:{kind}/") or not header.endswith(";base64"):
            raise bad_request(f"data URLs must look like data:{kind}/<type>;base64,<data>")
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise bad_request(f"{kind} is over {max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{kind} data URL is not valid base64") from None

    async def _fetch(self, url: str, kind: str, max_bytes: int) -> bytes:
        try:
            async with asyncio.timeout(self.limits.fetch_timeout_s):
                return await self._follow(url, kind, max_bytes)
        except TimeoutError:
            raise bad_request(f"{kind} fetch took over {self.limits.fetch_timeout_s:g}s") from None
        except BlockedAddress as error:
            raise bad_request(f"{kind} URL refused: {error}") from None
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.__cause__, BlockedAddress) or isinstance(
                getattr(error, "os_error", None), BlockedAddress
            ):
                cause = error.__cause__ or error.os_error
                raise bad_request(f"{kind} URL refused: {cause}") from None
            raise bad_request(f"{kind} URL host could not be resolved") from None
        except aiohttp.ClientError as error:
            raise bad_request(f"{kind} URL could not be fetched: {type(error).__name__}") from None

    async def _follow(self, url: str, kind: str, max_bytes: int) -> bytes:
        """GET with redirects followed by hand, each hop through the address guard."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.guard))
            )
        for _ in range(self.limits.max_redirects + 1):
            target = URL(url)
            if target.scheme not in ("http", "https") or not target.host:
                raise bad_request(f"{kind} URLs may only redirect to http(s) URLs")
            self.guard.check_url_host(target.host)
            async with self._session.get(target, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location", "")
                    url = str(target.join(URL(location)))
                    continue
                if response.status != 200:
                    raise bad_request(f"{kind} URL answered HTTP {response.status}")
                return await self._read_limited(response, kind, max_bytes)
        raise bad_request(f"{kind} URL redirects too many times")

    async def _read_limited(
        self, response: aiohttp.ClientResponse, kind: str, max_bytes: int
    ) -> bytes:
        declared = response.content_length
        if declared is not None and declared > max_bytes:
            raise bad_request(f"{kind} is over {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise bad_request(f"{kind} is over {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _from_file(self, url: str, kind: str, max_bytes: int) -> bytes:
        if self.limits.file_root is None:
            raise bad_request(f"file:// {kind} URLs are disabled on this server")
        root = Path(self.limits.file_root).resolve()
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(root):
            raise bad_request(f"file:// {kind} URL is outside the allowed directory")
        try:
            if path.stat().st_size > max_bytes:
                raise bad_request(f"{kind} is over {max_bytes} bytes")
            return path.read_bytes()
        except OSError:
            raise bad_request(f"file:// {kind} could not be read") from None
