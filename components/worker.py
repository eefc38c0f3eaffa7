"""The entry shape shared by the workers: flags → runtime + engine + handler → serve → drain.

Not a component: the workers use it, and never each other.
"""

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from triptych.engines import (
    Engine,
    EngineConfig,
    EngineUnavailable,
    GeneratingEngine,
    PrefillEngine,
    check_available,
    load,
)
from triptych.engines.memory import limit_device_memory
from triptych.models.checkpoint import CheckpointError, Needs, resolve_checkpoint
from triptych.observability import metrics
from triptych.protocol.settings import add_settings, setting, settings_from
from triptych.runtime import Env, Runtime, RuntimeConfig, Service, wire
from triptych.runtime.address import advertised_host, is_wildcard
from triptych.runtime.entry import (
    configure_logging,
    is_port_in_use,
    port_in_use,
    serve,
    serving,
    settle_heap,
)
from triptych.runtime.flags import FlagParser, add_logging_arguments, add_model_arguments
from triptych.runtime.port_file import write_port_file
from triptych.runtime.status_server import StatusServer
from triptych.transfer import EmbeddingTransport, TransferAgent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker is told on its command line."""

    runtime: RuntimeConfig
    engine: EngineConfig
    model_path: str
    """Checkpoint directory (the tiny Qwen2.5-VL when not given; a hub ID resolved into the
    Hugging Face cache)."""
    served_model_name: str
    """Model name clients ask for (default: the hub ID, or the checkpoint directory's name)."""
    advertise_host: str
    """The address other processes reach this worker at (its bootstrap endpoint, its status
    port in the NATS metadata): never a wildcard."""
    drain_grace_s: float = setting(
        30.0, "on SIGTERM, how long requests in flight may take to finish"
    )
    transfer_pool_mb: int = setting(256, "NIXL-registered memory for embeddings and KV in flight")
    metrics_host: str = setting("127.0.0.1", "interface of the status port (0.0.0.0 in a cluster)")
    """Interface of the worker's /metrics, /health and /ready."""
    metrics_port: int = setting(0, "port of /metrics, /health, /ready (0: a free one, announced)")
    """Announced in the logs and the NATS micro metadata."""
    transfer_timeout_s: float = setting(
        30.0, "how long a reader waits for image embeddings to arrive"
    )
    """The same wait holds for a KV cache."""
    max_queued_requests: int = setting(
        128,
        "requests an instance holds beyond --max-running-requests; more are refused at once "
        "(the frontend answers 503 with Retry-After when every instance is full)",
    )
    port_file: str | None = setting(
        None, 'write {"status": PORT} (and "bootstrap" on prefill) to this file once serving'
    )
    embedding_cache_bytes: int = 0
    """Bound of the encoder's cache of image embeddings by content key (0: no cache)."""


def _cache_bytes(text: str) -> int | None:
    """``--embedding-cache-bytes``: a byte count, or None for "auto" (sized from the pool)."""
    if text.strip().lower() == "auto":
        return None
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def worker_parser(prog: str, description: str) -> FlagParser:
    """A parser with the flags every worker takes."""
    parser = FlagParser(prog=prog, description=description)
    add_model_arguments(parser, "a worker fetches only the weights it loads")
    parser.add_argument(
        "--prefix-routing",
        choices=("affinity", "round-robin"),
        default="affinity",
        help="how a decode worker picks a request's prefill instance: affinity (rendezvous "
        "hashing of the prompt's first tokens and images, so a repeated prefix meets the "
        "prefill worker that cached it) or round-robin",
    )
    parser.add_argument(
        "--tp",
        "--tp-size",
        "--tensor-parallel-size",
        dest="tp_size",
        type=int,
        default=1,
        help="GPUs one model instance spans (only 1 today: scale out with more instances)",
    )
    add_settings(parser, WorkerConfig)
    parser.add_argument(
        "--embedding-cache-bytes",
        type=_cache_bytes,
        default="auto",
        help="bytes of image embeddings an encoder (encode worker, or an inline one) keeps by "
        "image content, LRU, so a repeated image skips the vision tower (auto: a quarter of "
        "--transfer-pool-mb; 0 turns the cache off)",
    )
    parser.add_argument(
        "--advertise-host",
        default=None,
        help="address other processes reach this worker at (default: $POD_IP, else the bind "
        "address, else this host's address toward NATS); never a wildcard",
    )
    add_logging_arguments(parser)
    RuntimeConfig.add_arguments(parser)
    EngineConfig.add_arguments(parser)
    return parser


def resolve_model_path(path: str) -> str:
    """The given checkpoint, or the tiny Qwen2.5-VL (generated once into ``.cache/``)."""
    if path:
        return path
    from triptych.models.tiny import default_model_path

    return str(default_model_path())


def worker_config(args: argparse.Namespace, component: str) -> WorkerConfig:
    """Build a worker's config from its parsed flags; its checkpoint is resolved here, once
    (a hub ID: only the files `component` reads are fetched). Refuses, in one line, what it
    cannot run."""
    configure_logging(args.log_level, args.log_format)
    if args.tp_size != 1:
        sys.exit(
            f"triptych {component} worker: --tp {args.tp_size}: tensor parallelism is not "
            "supported yet; run one model instance per GPU (more instances of a stage just "
            "join) and pin them with CUDA_VISIBLE_DEVICES or the launcher's --*-gpu flags"
        )
    try:
        checkpoint = resolve_checkpoint(
            resolve_model_path(args.model_path), args.revision, _needs(args, component)
        )
    except CheckpointError as error:
        sys.exit(f"triptych {component} worker: {error}")
    model_path = checkpoint.path
    runtime = RuntimeConfig.from_args(args)
    bind = args.disaggregation_bootstrap_host
    if is_wildcard(bind):
        bind = args.metrics_host
    advertise = advertised_host(bind, args.advertise_host, Env.read().pod_ip, runtime.nats_url)
    return WorkerConfig(
        **settings_from(args, WorkerConfig),
        runtime=runtime,
        engine=EngineConfig.from_args(args, model_path, advertise),
        model_path=model_path,
        served_model_name=args.served_model_name or checkpoint.name,
        advertise_host=advertise,
        embedding_cache_bytes=(
            (args.transfer_pool_mb << 20) // 4
            if args.embedding_cache_bytes is None
            else args.embedding_cache_bytes
        ),
    )


def _needs(args: argparse.Namespace, component: str) -> Needs:
    """Which files of a hub checkpoint the worker reads: none of the weights on the mock
    engine, the vision tower's alone on an encode worker of the hf engine."""
    encoder = args.encode_engine or args.engine
    if component == "encode":
        return {"mock": Needs.TOKENIZER, "hf": Needs.VISION}.get(encoder, Needs.WEIGHTS)
    return Needs.TOKENIZER if args.engine == encoder == "mock" else Needs.WEIGHTS


Setup = Callable[[Runtime, Service, EmbeddingTransport], Awaitable[Sequence[Engine]]]


def run_worker(
    config: WorkerConfig, component: str, setup: Setup, *, encodes_inline: bool = False
) -> None:
    """Serve one worker until SIGTERM/SIGINT, then drain and close everything it started.

    `setup` starts the worker's engines, adds its endpoints and returns the engines to close.
    Engines that move real tensors share the worker's one NIXL agent (`transport.agent`).
    A worker whose engine cannot run here exits at once with one line that says why.
    """
    try:
        check_available(config.engine, component, encodes_inline)
    except EngineUnavailable as reason:
        sys.exit(f"triptych {component} worker refuses to start: {reason}")
    limit_device_memory(config.engine)

    async def main(stop: asyncio.Event) -> int:
        agent = None
        if config.engine.name != "mock":
            agent = TransferAgent(component, config.engine.device, config.transfer_pool_mb << 20)
            await agent.start()
        transport = EmbeddingTransport(agent, config.transfer_timeout_s)
        ready = False
        exit_status = 1  # set when serving ends normally
        status = StatusServer(config.metrics_host, config.metrics_port, lambda: ready)
        try:
            await status.start()
        except OSError as error:
            if is_port_in_use(error):
                raise port_in_use(
                    config.metrics_host, config.metrics_port, "--metrics-port"
                ) from None
            raise
        log.info(
            "%s: /metrics, /health and /ready on %s:%d (advertised as %s)",
            component,
            config.metrics_host,
            status.port,
            config.advertise_host,
        )
        async with Runtime(config.runtime, name=component) as runtime:
            metadata = {
                "model": config.served_model_name,
                "host": config.advertise_host,
                "metrics_port": str(status.port),
            }
            capacity = config.engine.max_running_requests + config.max_queued_requests
            load.export_gauges(component)
            service = Service(
                runtime,
                component,
                metadata=metadata,
                max_in_flight=capacity,
                link_host=config.metrics_host,
                live_metadata=lambda: load.METER.snapshot().to_metadata(),
                on_done=lambda: load.METER.count("requests"),
            )
            if agent is not None:
                service.add_gauge("transfer_pool_bytes_in_use", lambda: agent.pool_in_use)
                metrics.POOL_IN_USE.set_function(lambda: agent.pool_in_use)
            engines = await setup(runtime, service, transport)
            try:
                if stop.is_set():  # stopped while the engines loaded: never join routing
                    log.info("%s: stopped before it served", component)
                    return 0
                settle_heap()
                await _join(service, engines, config.port_file, status.port)
                ready = True
                exit_status = await serving(stop, runtime)
                ready = False
                log.info("%s: stopping, draining for up to %gs", component, config.drain_grace_s)
                await service.drain(config.drain_grace_s)
            finally:
                await service.close()
                for engine in engines:
                    await engine.close()
                if agent is not None:
                    await agent.close()
                await status.close()
        return exit_status

    serve(main, f"{component} worker")


async def _join(
    service: Service, engines: Sequence[Engine], port_file: str | None, status_port: int
) -> None:
    """Join routing with the engines' limits in the metadata, then announce the bound ports."""
    service.announce(_context_metadata(engines))
    await service.start()
    if port_file:
        write_port_file(port_file, _bound_ports(status_port, engines))


def _context_metadata(engines: Sequence[Engine]) -> dict[str, str]:
    """The context limit of the worker's generating engine, for the frontend to check
    requests against (nothing when the engine sets none)."""
    limits = [
        limit
        for engine in engines
        if isinstance(engine, GeneratingEngine) and (limit := engine.context_length()) is not None
    ]
    return {wire.MAX_MODEL_LEN: str(min(limits))} if limits else {}


def _bound_ports(status_port: int, engines: Sequence[Engine]) -> dict[str, int]:
    ports = {"status": status_port}
    for engine in engines:
        if isinstance(engine, PrefillEngine):
            ports["bootstrap"] = engine.bootstrap_address[1]
    return ports
