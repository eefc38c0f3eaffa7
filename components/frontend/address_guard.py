"""SSRF guard: image URLs may not reach loopback, private, link-local or metadata addresses.

Checked where the address becomes known: literal IPs before connecting, host names in the
HTTP client's resolver (so a DNS answer pointing inside is refused), and every redirect hop
(redirects are followed by hand). Operators can allow-list host names or networks.
"""

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(OSError):
    """The URL leads to an address the guard refuses."""


class AddressGuard:
    """Decides which hosts and addresses image fetches may reach."""

    def __init__(
        self, allowed_hosts: tuple[str, ...] = (), allowed_networks: tuple[str, ...] = ()
    ) -> None:
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.allowed_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in allowed_networks
        )

    def host_allowed(self, host: str) -> bool:
        """An allow-listed host name skips the address check."""
        return host.lower().rstrip(".") in self.allowed_hosts

    def check_address(self, host: str, address: str) -> None:
        """Raise `BlockedAddress` unless `address` (which `host` led to) may be reached."""
        ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed_networks):
            return
        if not ip.is_global or ip.is_multicast:
            raise BlockedAddress(f"image host {host} resolves to a non-public address")

    def check_url_host(self, host: str) -> None:
        """Check a URL's host when it is a literal IP (names are checked when resolved)."""
        if self.host_allowed(host):
            return
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        self.check_address(host, host.strip("[]"))


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then refuses addresses the guard forbids."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: Any = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self.guard.host_allowed(host):
            for result in results:
                self.guard.check_address(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()
