"""Frontend configuration and the topologies it can front."""

import argparse
from dataclasses import dataclass, field

from triptych.runtime import RuntimeConfig
from triptych.transfer.image_bytes import INLINE_BYTES

# Each topology: the component the frontend calls first, then every stage that must be live.
TOPOLOGIES: dict[str, tuple[str, ...]] = {
    "E/P/D": ("encode", "decode", "prefill"),
    "E/PD": ("encode", "decode"),
    "EPD": ("decode",),
    "P/D": ("decode", "prefill"),
}


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
    served_model_name: str
    topology: str = "E/P/D"
    """One of `TOPOLOGIES`."""
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    """0 binds a free port; the one bound is logged and written to `port_file`."""
    port_file: str | None = None
    """Where to announce the bound port as ``{"http": N}`` once listening."""
    request_timeout_s: float = 300.0
    """Deadline of each request, from arrival to the last token."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest accepted request body."""
    max_inflight_requests: int = 512
    """Chat requests served at once; more are answered 503 with Retry-After at once."""
    migration_limit: int = 1
    """How many times a request whose instance died before its first token is sent again."""
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
    affinity_max_load: float = 0.5
    """Share of an instance's announced capacity this frontend may hold open on it before
    requests with affinity for it go to the next instance in hash order."""

    @property
    def stages(self) -> tuple[str, ...]:
        """Components of the topology, entry first."""
        return TOPOLOGIES[self.topology]

    @staticmethod
    def parser() -> argparse.ArgumentParser:
        """The frontend's flags."""
        parser = argparse.ArgumentParser(description="triptych OpenAI-compatible frontend")
        parser.add_argument("--model-path", default="")
        parser.add_argument("--served-model-name", default="")
        parser.add_argument(
            "--topology", type=str.upper, choices=tuple(TOPOLOGIES), default="E/P/D"
        )
        parser.add_argument("--http-host", default="127.0.0.1")
        parser.add_argument(
            "--http-port", type=int, default=8000, help="0: a free port, announced once bound"
        )
        parser.add_argument(
            "--port-file",
            default=None,
            help='write {"http": PORT} to this file once listening (for launchers and tests)',
        )
        parser.add_argument("--request-timeout-s", type=float, default=300.0)
        parser.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
        parser.add_argument(
            "--max-inflight-requests",
            type=int,
            default=FrontendConfig.max_inflight_requests,
            help="chat requests served at once; more are answered 503 with Retry-After",
        )
        parser.add_argument(
            "--migration-limit",
            type=int,
            default=FrontendConfig.migration_limit,
            help="times a request whose decode or prefill instance died before its first token "
            "is sent again to another instance (0: never)",
        )
        parser.add_argument("--max-images", type=int, default=ImageLimits.max_images)
        parser.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes)
        parser.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels)
        parser.add_argument(
            "--image-fetch-timeout-s", type=float, default=ImageLimits.fetch_timeout_s
        )
        parser.add_argument(
            "--allowed-image-hosts",
            default="",
            help="comma-separated hosts exempt from the private-address guard",
        )
        parser.add_argument(
            "--allowed-image-networks",
            default="",
            help="comma-separated CIDR networks exempt from the guard",
        )
        parser.add_argument(
            "--allowed-local-media-path",
            default=None,
            help="directory file:// image and video URLs may read from (off by default)",
        )
        parser.add_argument(
            "--max-videos", type=int, default=VideoLimits.max_videos, help="videos per request"
        )
        parser.add_argument(
            "--max-video-bytes",
            type=int,
            default=VideoLimits.max_bytes,
            help="encoded bytes per video",
        )
        parser.add_argument(
            "--max-video-frames",
            type=int,
            default=VideoLimits.max_frames,
            help="frames per video before sampling (counted without decoding)",
        )
        parser.add_argument(
            "--max-video-pixels",
            type=int,
            default=VideoLimits.max_pixels,
            help="pixels per video frame",
        )
        parser.add_argument(
            "--max-video-duration-s",
            type=float,
            default=VideoLimits.max_duration_s,
            help="seconds per video",
        )
        parser.add_argument(
            "--max-inline-image-bytes",
            type=int,
            default=INLINE_BYTES,
            help="image and video bytes per request carried inside the NATS message; the rest "
            "move by NIXL",
        )
        parser.add_argument(
            "--transfer-pool-mb",
            type=int,
            default=256,
            help="NIXL-registered memory for images waiting to be read by an encoder",
        )
        parser.add_argument(
            "--image-routing",
            choices=("affinity", "round-robin"),
            default="affinity",
            help="how a request with images picks its encoder: affinity (rendezvous hashing of "
            "the images' content keys, so a repeated image meets the encoder that cached it) "
            "or round-robin",
        )
        parser.add_argument(
            "--affinity-max-load",
            type=float,
            default=0.5,
            help="share of an encoder's announced capacity this frontend may hold open on it "
            "before requests with affinity for it go to the next encoder in hash order",
        )
        parser.add_argument("--log-level", default="INFO")
        parser.add_argument("--log-format", choices=("text", "json"), default="text")
        RuntimeConfig.add_arguments(parser)
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_path: str) -> "FrontendConfig":
        """Build from parsed flags; `model_path` already resolved."""
        return cls(
            runtime=RuntimeConfig.from_args(args),
            model_path=model_path,
            served_model_name=args.served_model_name or model_path.rstrip("/").rsplit("/", 1)[-1],
            topology=args.topology,
            http_host=args.http_host,
            http_port=args.http_port,
            port_file=args.port_file,
            request_timeout_s=args.request_timeout_s,
            max_body_bytes=args.max_body_bytes,
            max_inflight_requests=args.max_inflight_requests,
            migration_limit=args.migration_limit,
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
            affinity_max_load=args.affinity_max_load,
        )


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())
