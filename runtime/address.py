"""The address a process hands to others: routable, never a wildcard.

A worker may bind every interface (``0.0.0.0`` in a pod), but what it advertises — its
bootstrap endpoint, its status port in the NATS metadata — must be an address a process on
another host can reach: ``--advertise-host``, else ``$POD_IP``, else the bind address when it
names one interface, else this host's address on the route to the NATS server (the one network
every process of a stack shares).
"""

import ipaddress
import socket
from urllib.parse import urlparse

WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def is_wildcard(host: str) -> bool:
    """Whether `host` means "every interface" rather than one address."""
    return host.strip() in WILDCARDS


def advertised_host(
    bind_host: str, advertise_host: str | None = None, pod_ip: str | None = None, nats_url: str = ""
) -> str:
    """The address other processes should use to reach what this process binds on `bind_host`."""
    for candidate in (advertise_host, pod_ip):
        if candidate:
            if is_wildcard(candidate):
                raise ValueError(f"cannot advertise the wildcard address {candidate!r}")
            return candidate
    if not is_wildcard(bind_host):
        return bind_host
    return route_address(nats_url)


def route_address(nats_url: str) -> str:
    """This host's source address toward the (first) NATS server; a UDP "connect" sends
    nothing, it only asks the kernel for the route."""
    first = nats_url.split(",", maxsplit=1)[0].strip() or "nats://127.0.0.1:4222"
    parsed = urlparse(first if "://" in first else f"nats://{first}")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    try:
        target = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0][4]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            address = str(probe.getsockname()[0])
    except OSError as error:
        raise ValueError(
            f"cannot find this host's address toward {host}; pass --advertise-host or set POD_IP"
        ) from error
    if is_wildcard(address):
        raise ValueError("no routable address found; pass --advertise-host or set POD_IP")
    return address


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
