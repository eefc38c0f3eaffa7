"""Engine selection: ``--engine`` picks the implementation of each role."""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from triptych.engines.base import (
    AggregatedEngine,
    DecodeEngine,
    EncodeEngine,
    PrefillEngine,
    Runner,
)
from triptych.engines.mock import (
    MockAggregatedEngine,
    MockConfig,
    MockDecodeEngine,
    MockEncodeEngine,
    MockPrefillEngine,
)
from triptych.protocol import ErrorCode, ServiceError
from triptych.protocol.settings import add_settings, setting, settings_from
from triptych.transfer import TransferAgent

if TYPE_CHECKING:
    from triptych.engines.hf.config import HfConfig

ENGINES = ("hf", "mock", "sglang")
DEFAULT_ENGINE = "hf"


@dataclass(frozen=True)
class EngineConfig:
    """Which engine runs a role, on which checkpoint and device."""

    name: str = DEFAULT_ENGINE
    """One of `ENGINES`: the engine of prefill and decode (--engine)."""
    encode_name: str = ""
    """The engine of encoding, on an encode worker or a worker's inline encoder; empty means
    `name` (--encode-engine)."""
    model_path: str = ""
    """Checkpoint directory (the tiny Qwen2.5-VL when empty)."""
    device: str = setting("cpu", "torch device of the model: cpu, cuda, cuda:1, ...")
    bootstrap_host: str = setting(
        "127.0.0.1",
        "where a prefill worker's bootstrap endpoint (KV hand-off rooms) listens",
        "--disaggregation-bootstrap-host",
    )
    bootstrap_port: int = setting(
        0, "its port (0: a free one, announced)", "--disaggregation-bootstrap-port"
    )
    advertise_host: str | None = None
    """The address decode instances reach that endpoint at, when it differs from the bind
    address (a pod binds 0.0.0.0 and advertises its IP; the worker resolves it)."""
    max_model_len: int = setting(
        0,
        "tokens one sequence may hold, prompt included (default: the model's context length, "
        "at most 8192); a longer prompt is refused with a 400",
        "--max-model-len",
        "--context-length",
    )
    max_running_requests: int = setting(
        128,
        "sequences admitted at once (decode batches are no larger); more requests wait in a queue",
    )
    mem_fraction_static: float = setting(
        0.9,
        "fraction of the device's memory this process may hold (weights + KV cache); the KV "
        "cache gets what is left of it, at most what --max-running-requests sequences of "
        "--max-model-len tokens fill; on CUDA the process's allocations are capped at it, so "
        "workers can share a GPU",
        "--mem-fraction-static",
        "--mem-fraction",
    )
    kv_cache_tokens: int | None = setting(
        None, "size the KV cache in tokens instead of from --mem-fraction-static"
    )
    page_size: int = setting(16, "token positions per KV cache block")
    chunked_prefill_size: int = setting(
        2048,
        "prompt positions one prefill step runs at most: a longer prompt is prefilled in "
        "chunks, with decode steps in between",
    )
    cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs (--disable-cuda-graph turns it off)."""
    max_prefill_batch: int = setting(
        8,
        "whole prompts queued together that share one prefill step on CUDA (their padded "
        "length counts against --chunked-prefill-size; the CPU prefills one at a time)",
    )
    prefix_cache: bool = True
    """Reuse the KV cache of repeated prompt prefixes (--disable-prefix-cache turns it off)."""
    mock: MockConfig = field(default_factory=MockConfig)
    """Simulated costs of the mock engine."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The engine flags every worker takes."""
        group = parser.add_argument_group("engine")
        group.add_argument(
            "--engine",
            choices=ENGINES,
            default=DEFAULT_ENGINE,
            help="what runs the model: hf (PyTorch + transformers), sglang (SGLang, GPU), mock "
            "(simulated, for load tests)",
        )
        group.add_argument(
            "--encode-engine",
            choices=ENGINES,
            default="",
            help="engine that encodes images, on an encode worker or inline (default: --engine)",
        )
        add_settings(group, EngineConfig)
        group.add_argument(
            "--disable-cuda-graph",
            action="store_true",
            help="run decode steps eagerly instead of replaying captured CUDA graphs",
        )
        group.add_argument(
            "--disable-prefix-cache",
            action="store_true",
            help="compute every prompt whole instead of reusing the KV cache of a prefix "
            "(text and images by content key) that this worker computed before",
        )
        add_settings(group, MockConfig)
        group.add_argument(
            "--mock-fail-prefill",
            action="store_true",
            help="fault injection: every prefill fails after answering",
        )

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, model_path: str, advertise_host: str | None = None
    ) -> "EngineConfig":
        """Build from parsed flags; `advertise_host`: the address this worker advertises."""
        return cls(
            **settings_from(args, EngineConfig),
            name=args.engine,
            encode_name=args.encode_engine,
            model_path=model_path,
            advertise_host=advertise_host,
            cuda_graphs=not args.disable_cuda_graph,
            prefix_cache=not args.disable_prefix_cache,
            mock=MockConfig(
                **settings_from(args, MockConfig),
                fail_prefill=args.mock_fail_prefill,
                max_running=args.max_running_requests,
            ),
        )

    def encoding(self) -> "EngineConfig":
        """This config with the encode engine in `name` (what an encoder is built from)."""
        return dataclasses.replace(self, name=self.encode_name or self.name, encode_name="")


def check_available(config: EngineConfig, role: str, encodes_inline: bool = False) -> None:
    """Refuse, before anything starts, a role this interpreter or machine cannot run.

    Raises `EngineUnavailable` with a one-line reason: SGLang missing from the interpreter,
    an ``sglang.Engine`` without CUDA or SGLang's kernels, or an SGLang encoder sharing a
    process with an ``sglang.Engine`` (SGLang's config is process-wide).
    """
    from triptych.engines.sglang.preflight import (
        EngineUnavailable,
        require_gpu_runtime,
        require_sglang,
    )

    encoder = config.encode_name or config.name
    if role == "encode":
        if encoder == "sglang":
            require_sglang()
        return
    if config.name == "sglang":
        if encodes_inline and encoder == "sglang":
            raise EngineUnavailable(
                f"engine 'sglang' cannot encode inline in the {role} worker: SGLang's MMEncoder "
                "and sglang.Engine cannot share a process; run a dedicated encode worker or "
                "pass --encode-engine hf"
            )
        require_gpu_runtime(role)
    elif encodes_inline and encoder == "sglang":
        require_sglang()


def _hf(config: EngineConfig) -> "HfConfig":
    from triptych.engines.hf.config import HfConfig

    return HfConfig(
        max_len=config.max_model_len,
        max_running=config.max_running_requests,
        mem_fraction_static=config.mem_fraction_static,
        kv_tokens=config.kv_cache_tokens,
        page_size=config.page_size,
        chunked_prefill_size=config.chunked_prefill_size,
        prefill_batch=config.max_prefill_batch,
        cuda_graphs=config.cuda_graphs,
        prefix_cache=config.prefix_cache,
    )


def _unavailable(config: EngineConfig, role: str) -> ServiceError:
    return ServiceError(
        ErrorCode.UNAVAILABLE, f"engine '{config.name}' cannot run the {role} role in this build"
    )


def encode_engine(config: EngineConfig, runner: Runner | None = None) -> EncodeEngine:
    """The engine for an encode worker, or for a worker's inline encoder (`runner`: where its
    model work runs, see `Engine.model_runner`)."""
    if config.name == "mock":
        return MockEncodeEngine(config.mock)
    if config.name == "hf":
        from triptych.engines.hf.encode import HfEncodeEngine

        return HfEncodeEngine(config.model_path, config.device, runner=runner)
    if config.name == "sglang":
        from triptych.engines.sglang.encode import SglangEncodeEngine

        return SglangEncodeEngine(config)
    raise _unavailable(config, "encode")


def prefill_engine(config: EngineConfig, agent: TransferAgent | None) -> PrefillEngine:
    """The engine for a prefill worker (`agent` moves its KV caches)."""
    if config.name == "mock":
        return MockPrefillEngine(
            config.mock, config.bootstrap_host, config.bootstrap_port, config.advertise_host
        )
    if config.name == "hf" and agent is not None:
        from triptych.engines.hf.disaggregated import HfPrefillEngine

        return HfPrefillEngine(
            config.model_path,
            agent,
            config.device,
            config.bootstrap_host,
            config.bootstrap_port,
            advertise_host=config.advertise_host,
            config=_hf(config),
        )
    if config.name == "sglang":
        from triptych.engines.sglang.disaggregated import SglangPrefillEngine

        return SglangPrefillEngine(config)
    raise _unavailable(config, "prefill")


def decode_engine(config: EngineConfig, agent: TransferAgent | None) -> DecodeEngine:
    """The engine for a decode worker (`agent` receives KV caches)."""
    if config.name == "mock":
        return MockDecodeEngine(config.mock)
    if config.name == "hf" and agent is not None:
        from triptych.engines.hf.disaggregated import HfDecodeEngine

        return HfDecodeEngine(config.model_path, agent, config.device, _hf(config))
    if config.name == "sglang":
        from triptych.engines.sglang.disaggregated import SglangDecodeEngine

        return SglangDecodeEngine(config)
    raise _unavailable(config, "decode")


def aggregated_engine(config: EngineConfig) -> AggregatedEngine:
    """The engine for an aggregated (prefill + decode) worker."""
    if config.name == "mock":
        return MockAggregatedEngine(config.mock)
    if config.name == "hf":
        from triptych.engines.hf.aggregated import HfAggregatedEngine

        return HfAggregatedEngine(config.model_path, config.device, _hf(config))
    if config.name == "sglang":
        from triptych.engines.sglang.aggregated import SglangAggregatedEngine

        return SglangAggregatedEngine(config)
    raise _unavailable(config, "aggregated")
