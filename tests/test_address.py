"""What a process advertises to others: the routable address, never a wildcard."""

import pytest

from triptych.runtime.address import advertised_host
from triptych.transfer import BootstrapServer


def test_advertise_host_wins_then_pod_ip_then_the_bind_address() -> None:
    assert advertised_host("0.0.0.0", "10.1.2.3", "10.9.9.9") == "10.1.2.3"
    assert advertised_host("0.0.0.0", None, "10.9.9.9") == "10.9.9.9"
    assert advertised_host("127.0.0.1") == "127.0.0.1"


def test_a_wildcard_bind_advertises_the_address_toward_nats() -> None:
    assert advertised_host("0.0.0.0", nats_url="nats://127.0.0.1:4222") == "127.0.0.1"
    assert advertised_host("::", nats_url="nats://user:pw@127.0.0.1:4222,nats://b:4222") == (
        "127.0.0.1"
    )


def test_a_wildcard_is_never_advertised() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        advertised_host("0.0.0.0", "0.0.0.0")
    with pytest.raises(ValueError, match="needs an address to advertise"):
        BootstrapServer("0.0.0.0", 0)
    assert BootstrapServer("0.0.0.0", 0, advertise_host="192.0.2.7").host == "192.0.2.7"
