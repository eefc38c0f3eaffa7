"""Frontend configuration."""

import argparse
from dataclasses import dataclass, field

from triptych.components.topology import TOPOLOGIES, add_topology_argument
from triptych.runtime import RuntimeConfig
from triptych.runtime.flags import FlagParser, add_logging_arguments, add_model_arguments
from triptych.transfer.image_bytes import INLINE_BYTES


@dataclass(frozen=True)
class ImageLimits:
    """What the frontend accepts as images."""

    max_images: int = 8
    """Images per request."""
    max_bytes: int = 20 * 1024 * 1024
    """Encoded bytes per image."""
    max_pixels: int = 32 * 1024 * 1024
    """Decoded pixels per image (also the decompression-bomb guard)."""
    fetch_timeout_s: float = 10.0
    """Time to fetch one http(s) image, connection included."""
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

    max_videos: int = 4
    """Videos per request."""
    max_bytes: int = 32 * 1024 * 1024
    """Encoded bytes per video."""
    max_frames: int = 7200
    """Frames per video (before sampling): checked from the container's packets without
    decoding, so a tiny file holding a huge number of frames is refused at once."""
    max_pixels: int = 3840 * 2160
    """Pixels per frame, checked from the stream header before decoding."""
    max_duration_s: float = 600.0
    """Seconds per video."""


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
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    """0 binds a free port; the one bound is logged and written to `port_file`."""
    port_file: str | None = None
    """Where to announce the bound port as ``{"http": N}`` once listening."""
    request_timeout_s: float = 300.0
    """Deadline of each request, from arrival to the last token."""
    drain_grace_s: float = 30.0
    """On SIGTERM: how long requests in flight may take to finish (new ones are refused)."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest accepted request body."""
    max_inflight_requests: int = 512
    """Chat requests served at once; more are answered 503 with Retry-After at once."""
    migration_limit: int = 1
    """How many times a request whose instance died before its first token is sent again."""
    api_key: str | None = None
    """Clients must send ``Authorization: Bearer <key>`` (``/health``, ``/ready`` and
    ``/metrics`` stay open); None lets everyone in."""
    chat_template: str | None = None
    """A Jinja chat template replacing the checkpoint's."""
    model_sampling_defaults: bool = True
    """Sampling fields a request leaves out come from the checkpoint's
    ``generation_config.json`` (``--sampling-defaults model``) rather than OpenAI's defaults."""
    access_log: bool = True
    """One log line per request: id, status, tokens, time to first token, total time."""
    images: ImageLimits = field(default_factory=ImageLimits)
    videos: VideoLimits = field(default_factory=VideoLimits)
    inline_image_bytes: int = INLINE_BYTES
    """Encoded image and video bytes per request that may ride inside the NATS message; larger
    ones wait in this process's registered memory and the encoder READs them over NIXL."""
    transfer_pool_mb: int = 256
    """Size of the NIXL-registered memory holding those images until they are read."""
    image_routing: str = "affinity"
    """How requests with images pick the entry stage's instance: "affinity" (rendezvous
    hashing of the images' content keys, so a repeated image meets the encoder that cached
    it) or "round-robin"."""
    prefix_routing: str = "affinity"
    """How requests pick the aggregated worker in the EPD topology: "affinity" (rendezvous
    hashing of the prompt's first tokens and images, so a repeated prefix meets the worker
    whose prefix cache holds it) or "round-robin"."""
    affinity_max_load: float = 0.5
    """Share of an instance's announced capacity this frontend may hold open on it before
    requests with affinity for it go to the next instance in hash order."""

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
        parser.add_argument(
            "--http-host", "--host", default="127.0.0.1", help="interface to listen on"
        )
        parser.add_argument(
            "--http-port",
            "--port",
            type=int,
            default=8000,
            help="port to listen on (0: a free port, announced once bound)",
        )
        parser.add_argument(
            "--port-file",
            default=None,
            help='write {"http": PORT} to this file once listening (for launchers and tests)',
        )
        parser.add_argument(
            "--api-key",
            default=None,
            help="require 'Authorization: Bearer KEY' on every endpoint but /health, /ready "
            "and /metrics",
        )
        parser.add_argument(
            "--chat-template",
            default=None,
            help="Jinja chat template (a file, or the template itself) replacing the checkpoint's",
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
        parser.add_argument(
            "--request-timeout-s",
            type=float,
            default=FrontendConfig.request_timeout_s,
            help="deadline of each request, from arrival to its last token",
        )
        parser.add_argument(
            "--drain-grace-s",
            type=float,
            default=FrontendConfig.drain_grace_s,
            help="on SIGTERM, how long requests in flight may take to finish",
        )
        parser.add_argument(
            "--max-body-bytes",
            type=int,
            default=FrontendConfig.max_body_bytes,
            help="largest request body accepted (413 beyond)",
        )
        parser.add_argument(
            "--max-inflight-requests",
            type=int,
            default=FrontendConfig.max_inflight_requests,
            help="requests served at once; more are answered 503 with Retry-After",
        )
        parser.add_argument(
            "--migration-limit",
            type=int,
            default=FrontendConfig.migration_limit,
            help="times a request whose decode or prefill instance died before its first token "
            "is sent again to another instance (0: never)",
        )
        images = parser.add_argument_group("images")
        images.add_argument(
            "--max-images", type=int, default=ImageLimits.max_images, help="images per request"
        )
        images.add_argument(
            "--max-image-bytes",
            type=int,
            default=ImageLimits.max_bytes,
            help="encoded bytes per image",
        )
        images.add_argument(
            "--max-image-pixels",
            type=int,
            default=ImageLimits.max_pixels,
            help="decoded pixels per image",
        )
        images.add_argument(
            "--image-fetch-timeout-s",
            type=float,
            default=ImageLimits.fetch_timeout_s,
            help="time to fetch one http(s) image, connection included",
        )
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
        videos = parser.add_argument_group("videos")
        videos.add_argument(
            "--max-videos", type=int, default=VideoLimits.max_videos, help="videos per request"
        )
        videos.add_argument(
            "--max-video-bytes",
            type=int,
            default=VideoLimits.max_bytes,
            help="encoded bytes per video",
        )
        videos.add_argument(
            "--max-video-frames",
            type=int,
            default=VideoLimits.max_frames,
            help="frames per video before sampling (counted without decoding)",
        )
        videos.add_argument(
            "--max-video-pixels",
            type=int,
            default=VideoLimits.max_pixels,
            help="pixels per video frame",
        )
        videos.add_argument(
            "--max-video-duration-s",
            type=float,
            default=VideoLimits.max_duration_s,
            help="seconds per video",
        )
        images.add_argument(
            "--max-inline-image-bytes",
            type=int,
            default=INLINE_BYTES,
            help="image and video bytes per request carried inside the NATS message; the rest "
            "move by NIXL",
        )
        images.add_argument(
            "--transfer-pool-mb",
            type=int,
            default=256,
            help="NIXL-registered memory for images waiting to be read by an encoder",
        )
        parser.add_argument(
            "--image-routing",
            choices=("affinity", "round-robin"),
            default=FrontendConfig.image_routing,
            help="how a request with images picks its encoder: affinity (rendezvous hashing of "
            "the images' content keys, so a repeated image meets the encoder that cached it) "
            "or round-robin",
        )
        parser.add_argument(
            "--prefix-routing",
            choices=("affinity", "round-robin"),
            default=FrontendConfig.prefix_routing,
            help="how a request picks its worker in the EPD topology: affinity (rendezvous "
            "hashing of the prompt's first tokens and images, so a repeated prefix meets the "
            "worker that cached it) or round-robin",
        )
        parser.add_argument(
            "--affinity-max-load",
            type=float,
            default=FrontendConfig.affinity_max_load,
            help="share of an encoder's announced capacity this frontend may hold open on it "
            "before requests with affinity for it go to the next encoder in hash order",
        )
        add_logging_arguments(parser)
        RuntimeConfig.add_arguments(parser)
        return parser

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, model_path: str, model_name: str
    ) -> "FrontendConfig":
        """Build from parsed flags; `model_path` already resolved to a directory, `model_name`
        the name it is known by (the hub ID or the directory's name)."""
        return cls(
            runtime=RuntimeConfig.from_args(args),
            model_path=model_path,
            served_model_name=args.served_model_name or model_name,
            model_source=args.model_path or model_path,
            topology=args.topology,
            http_host=args.http_host,
            http_port=args.http_port,
            port_file=args.port_file,
            request_timeout_s=args.request_timeout_s,
            drain_grace_s=args.drain_grace_s,
            max_body_bytes=args.max_body_bytes,
            max_inflight_requests=args.max_inflight_requests,
            migration_limit=args.migration_limit,
            api_key=args.api_key or None,
            chat_template=args.chat_template,
            model_sampling_defaults=args.sampling_defaults == "model",
            access_log=not args.disable_access_log,
            images=ImageLimits(
                max_images=args.max_images,
                max_bytes=args.max_image_bytes,
                max_pixels=args.max_image_pixels,
                fetch_timeout_s=args.image_fetch_timeout_s,
                file_root=args.allowed_local_media_path,
                allowed_hosts=_split(args.allowed_image_hosts),
                allowed_networks=_split(args.allowed_image_networks),
            ),
            videos=VideoLimits(
                max_videos=args.max_videos,
                max_bytes=args.max_video_bytes,
                max_frames=args.max_video_frames,
                max_pixels=args.max_video_pixels,
                max_duration_s=args.max_video_duration_s,
            ),
            inline_image_bytes=args.max_inline_image_bytes,
            transfer_pool_mb=args.transfer_pool_mb,
            image_routing=args.image_routing,
            prefix_routing=args.prefix_routing,
            affinity_max_load=args.affinity_max_load,
        )


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())
