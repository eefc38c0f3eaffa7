"""Frontend configuration."""

import argparse
from dataclasses import dataclass, field

from triptych.components.topology import TOPOLOGIES, add_topology_argument
from triptych.protocol.settings import add_settings, setting, settings_from
from triptych.runtime import RuntimeConfig
from triptych.runtime.flags import FlagParser, add_logging_arguments, add_model_arguments
from triptych.transfer.image_bytes import INLINE_BYTES


@dataclass(frozen=True)
class ImageLimits:
    """What the frontend accepts as images."""

    max_images: int = setting(8, "images per request")
    max_bytes: int = setting(20 * 1024 * 1024, "encoded bytes per image", "--max-image-bytes")
    max_pixels: int = setting(32 * 1024 * 1024, "decoded pixels per image", "--max-image-pixels")
    """Also the decompression-bomb guard."""
    fetch_timeout_s: float = setting(
        10.0, "time to fetch one http(s) image, connection included", "--image-fetch-timeout-s"
    )
    file_root: str | None = None
    """Directory ``file://`` URLs may read from; None refuses ``file://``."""
    max_redirects: int = 3
    """Redirects followed per image (each hop passes the address guard)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names image URLs may reach even if they resolve to non-public addresses."""
    allowed_networks: tuple[str, ...] = ()
    """Networks (CIDR) image URLs may reach even if not public (e.g. 10.0.0.0/8)."""


@dataclass(frozen=True)
class VideoLimits:
    """What the frontend accepts as videos (fetched like images, under the image flags'
    timeout, redirects, allow-lists and ``file://`` root)."""

    max_videos: int = setting(4, "videos per request")
    max_bytes: int = setting(32 * 1024 * 1024, "encoded bytes per video", "--max-video-bytes")
    max_frames: int = setting(
        7200, "frames per video before sampling (counted without decoding)", "--max-video-frames"
    )
    """Checked from the container's packets without decoding, so a tiny file holding a huge
    number of frames is refused at once."""
    max_pixels: int = setting(3840 * 2160, "pixels per video frame", "--max-video-pixels")
    """Checked from the stream header before decoding."""
    max_duration_s: float = setting(600.0, "seconds per video", "--max-video-duration-s")


ROUTINGS = ("affinity", "round-robin")
"""How a request picks an instance of its entry stage."""


@dataclass(frozen=True)
class FrontendConfig:
    """Everything the frontend is told on its command line."""

    runtime: RuntimeConfig
    model_path: str
    """Local directory of the checkpoint (a hub ID already resolved into the HF cache)."""
    served_model_name: str
    model_source: str = ""
    """What ``--model-path`` said: the hub ID or the directory (shown in ``/v1/models``)."""
    topology: str = "E/P/D"
    """One of `TOPOLOGIES`."""
    http_host: str = setting("127.0.0.1", "interface to listen on", "--http-host", "--host")
    http_port: int = setting(
        8000, "port to listen on (0: a free port, announced once bound)", "--http-port", "--port"
    )
    """The port bound is logged and written to `port_file`."""
    port_file: str | None = setting(
        None, 'write {"http": PORT} to this file once listening (for launchers and tests)'
    )
    api_key: str | None = setting(
        None,
        "require 'Authorization: Bearer KEY' on every endpoint but /health, /ready and /metrics",
    )
    """None lets everyone in."""
    chat_template: str | None = setting(
        None, "Jinja chat template (a file, or the template itself) replacing the checkpoint's"
    )
    request_timeout_s: float = setting(
        300.0, "deadline of each request, from arrival to its last token"
    )
    drain_grace_s: float = setting(
        30.0, "on SIGTERM, how long requests in flight may take to finish"
    )
    """New requests are refused meanwhile."""
    max_body_bytes: int = setting(64 * 1024 * 1024, "largest request body accepted (413 beyond)")
    max_inflight_requests: int = setting(
        512, "requests served at once; more are answered 503 with Retry-After"
    )
    migration_limit: int = setting(
        1,
        "times a request whose decode or prefill instance died before its first token is sent "
        "again to another instance (0: never)",
    )
    model_sampling_defaults: bool = True
    """Sampling fields a request leaves out come from the checkpoint's
    ``generation_config.json`` (``--sampling-defaults model``) rather than OpenAI's defaults."""
    access_log: bool = True
    """One log line per request: id, status, tokens, time to first token, total time."""
    images: ImageLimits = field(default_factory=ImageLimits)
    videos: VideoLimits = field(default_factory=VideoLimits)
    inline_image_bytes: int = setting(
        INLINE_BYTES,
        "image and video bytes per request carried inside the NATS message; the rest move by NIXL",
        "--max-inline-image-bytes",
    )
    """Larger ones wait in this process's registered memory and the encoder READs them."""
    transfer_pool_mb: int = setting(
        256, "NIXL-registered memory for images waiting to be read by an encoder"
    )
    image_routing: str = setting(
        "affinity",
        "how a request with images picks its encoder: affinity (rendezvous hashing of the "
        "images' content keys, so a repeated image meets the encoder that cached it) or "
        "round-robin",
        choices=ROUTINGS,
    )
    prefix_routing: str = setting(
        "affinity",
        "how a request picks its worker in the EPD topology: affinity (rendezvous hashing of "
        "the prompt's first tokens and images, so a repeated prefix meets the worker that "
        "cached it) or round-robin",
        choices=ROUTINGS,
    )
    frontend_processes: int = setting(
        1,
        "frontend processes serving the HTTP port together (one per core the frontend may "
        "use); the limits above are shared out among them",
        "--frontend-processes",
        "--api-server-count",
    )
    """The leader binds the port with SO_REUSEPORT and starts the others (`group`)."""
    affinity_max_load: float = setting(
        0.5,
        "share of an encoder's announced capacity this frontend may hold open on it before "
        "requests with affinity for it go to the next encoder in hash order",
    )

    @property
    def stages(self) -> tuple[str, ...]:
        """Components of the topology, entry first (`components.topology`)."""
        return TOPOLOGIES[self.topology].components

    @property
    def text_entry(self) -> str:
        """The component text-only requests enter at (`components.topology`)."""
        return TOPOLOGIES[self.topology].text_entry

    @staticmethod
    def parser(prog: str = "triptych frontend") -> FlagParser:
        """The frontend's flags."""
        parser = FlagParser(
            prog=prog,
            description="The OpenAI-compatible HTTP frontend: tokenizes requests, expands "
            "images, sends them into the stages of the topology and streams the answers back.",
        )
        add_model_arguments(
            parser, "the frontend fetches only its tokenizer, config and processor files"
        )
        add_topology_argument(parser, "which stages serve requests (E/P/D, E/PD, EPD or P/D)")
        add_settings(
            parser,
            FrontendConfig,
            "http_host",
            "http_port",
            "port_file",
            "api_key",
            "chat_template",
        )
        parser.add_argument(
            "--sampling-defaults",
            choices=("model", "openai"),
            default="model",
            help="where sampling fields a request leaves out come from: the checkpoint's "
            "generation_config.json (model) or OpenAI's defaults (openai)",
        )
        parser.add_argument(
            "--disable-access-log",
            action="store_true",
            help="no log line per request (id, status, tokens, TTFT, total time)",
        )
        add_settings(
            parser,
            FrontendConfig,
            "request_timeout_s",
            "drain_grace_s",
            "max_body_bytes",
            "max_inflight_requests",
            "migration_limit",
        )
        images = parser.add_argument_group("images")
        add_settings(images, ImageLimits)
        images.add_argument(
            "--allowed-image-hosts",
            default="",
            help="comma-separated hosts exempt from the private-address guard",
        )
        images.add_argument(
            "--allowed-image-networks",
            default="",
            help="comma-separated CIDR networks exempt from the private-address guard",
        )
        images.add_argument(
            "--allowed-local-media-path",
            default=None,
            help="directory file:// image and video URLs may read from (off by default)",
        )
        add_settings(parser.add_argument_group("videos"), VideoLimits)
        add_settings(images, FrontendConfig, "inline_image_bytes", "transfer_pool_mb")
        add_settings(parser, FrontendConfig, "image_routing", "prefix_routing", "affinity_max_load")
        add_settings(parser, FrontendConfig, "frontend_processes")
        parser.add_argument("--frontend-group", default=None, help=argparse.SUPPRESS)
        add_logging_arguments(parser)
        RuntimeConfig.add_arguments(parser)
        return parser

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, model_path: str, model_name: str
    ) -> "FrontendConfig":
        """Build from parsed flags; `model_path` already resolved to a directory, `model_name`
        the name it is known by (the hub ID or the directory's name)."""
        empty_key_is_none = {"api_key": args.api_key or None}  # TRIPTYCH_API_KEY="" is no key
        return cls(
            **settings_from(args, FrontendConfig) | empty_key_is_none,
            runtime=RuntimeConfig.from_args(args),
            model_path=model_path,
            served_model_name=args.served_model_name or model_name,
            model_source=args.model_path or model_path,
            topology=args.topology,
            model_sampling_defaults=args.sampling_defaults == "model",
            access_log=not args.disable_access_log,
            images=ImageLimits(
                **settings_from(args, ImageLimits),
                file_root=args.allowed_local_media_path,
                allowed_hosts=_split(args.allowed_image_hosts),
                allowed_networks=_split(args.allowed_image_networks),
            ),
            videos=VideoLimits(**settings_from(args, VideoLimits)),
        )


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())
