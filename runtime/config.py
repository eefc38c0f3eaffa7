"""Runtime configuration: how a process joins NATS and how calls behave."""

import argparse
from dataclasses import dataclass, fields

from triptych.protocol.settings import add_settings, setting
from triptych.runtime.env import Env


@dataclass(frozen=True)
class RuntimeConfig:
    """How one process joins the control plane. Defaults come from the environment (`Env`)."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL (or a comma-separated list)."""
    namespace: str = "triptych"
    """Prefix of every subject and service name; stacks in different namespaces never meet."""
    nats_user: str | None = None
    """NATS user name (with `nats_password`)."""
    nats_password: str | None = None
    """NATS password."""
    nats_token: str | None = None
    """NATS token."""
    nats_tls_ca: str | None = setting(
        None, "CA bundle to verify the NATS server's certificate; enables TLS"
    )
    ack_timeout_s: float = setting(
        1.0, "how long a caller waits for an instance to accept a call before trying another"
    )
    """Workers accept on arrival, before any work, so only a dead or frozen instance misses
    this; the call then moves on."""
    discovery_interval_s: float = 1.0
    """How often clients ping the instances of the components they call."""
    instance_ttl_s: float = 2.5
    """An instance that has not answered a ping for this long leaves routing."""
    keepalive_interval_s: float = 1.0
    """A worker holding a silent stream sends a keepalive this often."""
    stream_idle_timeout_s: float = setting(
        5.0, "a reply stream silent this long (no data, no keepalive) fails"
    )
    direct_streams: bool = True
    """Calls and their response frames travel on direct TCP links between caller and worker
    where the worker offers one (``stream_port`` in its NATS metadata), instead of through
    nats-server."""
    reconnect_window_s: float = setting(
        30.0,
        "exit non-zero when NATS stays unreachable this long",
        "--nats-reconnect-window-s",
        dest="reconnect_window_s",
    )
    """For its supervisor (Kubernetes, systemd, a launcher) to restart the process."""

    @classmethod
    def from_env(cls, env: Env | None = None) -> "RuntimeConfig":
        """Defaults overlaid with the environment."""
        env = env or Env.read()
        return cls(
            nats_url=env.nats_url or cls.nats_url,
            namespace=env.namespace,
            nats_user=env.nats_user,
            nats_password=env.nats_password,
            nats_token=env.nats_token,
        )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the runtime's command-line flags (defaults from the environment)."""
        base = cls.from_env()
        group = parser.add_argument_group("runtime")
        group.add_argument("--nats-url", default=base.nats_url, help="NATS server URL ($NATS_URL)")
        group.add_argument(
            "--namespace", default=base.namespace, help="subject prefix ($TRIPTYCH_NAMESPACE)"
        )
        group.add_argument(
            "--no-direct-streams",
            dest="direct_streams",
            action="store_false",
            default=base.direct_streams,
            help="send calls and response frames through NATS rather than on direct TCP links "
            "between caller and worker",
        )
        add_settings(group, cls)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RuntimeConfig":
        """Build the config from parsed flags; credentials stay in the environment only."""
        base = cls.from_env()
        names = {f.name for f in fields(cls)}
        overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **overrides})
