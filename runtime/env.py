"""The one place environment variables are read, typed and documented.

(Except ``DYN_NVTX``: `triptych.observability.nvtx` reads it, a leaf every layer imports.)
"""

import os
from dataclasses import dataclass

FLAG_PREFIX = "TRIPTYCH_"
"""Every command-line flag ``--some-flag`` falls back to ``TRIPTYCH_SOME_FLAG``."""


def flag_variable(flag: str) -> str:
    """The environment variable behind a flag: ``--model-path`` → ``TRIPTYCH_MODEL_PATH``."""
    return FLAG_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def flag_fallback(flag: str) -> str | None:
    """The value the environment gives `flag` (``TRIPTYCH_<FLAG>``), or None when unset."""
    return os.environ.get(flag_variable(flag))


@dataclass(frozen=True)
class Env:
    """Environment variables triptych honours (all optional)."""

    nats_url: str | None
    """NATS_URL: the NATS server to join; the launch scripts start a private one when unset."""
    nats_user: str | None
    """NATS_USER / NATS_PASSWORD: user-password credentials for NATS."""
    nats_password: str | None
    nats_token: str | None
    """NATS_TOKEN: token credentials for NATS."""
    namespace: str
    """TRIPTYCH_NAMESPACE: prefix of every subject and service name (default "triptych")."""
    pod_ip: str | None
    """POD_IP: this process's routable address (Kubernetes sets it from the downward API);
    the address a worker advertises unless ``--advertise-host`` names one."""

    @classmethod
    def read(cls) -> "Env":
        """Read the current process environment."""
        return cls(
            nats_url=os.environ.get("NATS_URL") or None,
            nats_user=os.environ.get("NATS_USER") or None,
            nats_password=os.environ.get("NATS_PASSWORD") or None,
            nats_token=os.environ.get("NATS_TOKEN") or None,
            namespace=os.environ.get("TRIPTYCH_NAMESPACE") or "triptych",
            pod_ip=os.environ.get("POD_IP") or None,
        )
