"""SGLang's ``ServerArgs`` for each role triptych gives it, from triptych's engine config.

Roles and what SGLang is told:

* ``encoder``: ``encoder_only`` (SGLang builds and loads the vision tower alone); on CPU the
  torch-native attention backend in float32, the only combination SGLang's tower runs there.
* ``prefill`` / ``decode``: ``language_only`` weights, SGLang's own PD disaggregation over the
  NIXL transfer backend, its bootstrap server inside the prefill engine on
  ``--disaggregation-bootstrap-port``.
* ``agg``: the same language-only engine without disaggregation (E/PD, EPD).

Images always reach a language engine as one precomputed ``processor_output`` item per
request (see `image_item`), so the language engines never run a tower nor fetch anything.
``language_only`` instances would otherwise hand images to SGLang encoders of their own;
adaptive dispatch with a threshold above one item keeps every request local.
"""

import os
import socket
from typing import Any, Literal

from triptych.engines.registry import EngineConfig

Role = Literal["encoder", "prefill", "decode", "agg"]

DISPATCH_MIN_ITEMS_ENV = "SGLANG_ENCODER_DISPATCH_MIN_ITEMS"
"""SGLang's threshold (in multimodal items) above which a language-only instance sends a
request's images to its SGLang encoders; triptych sends one item and sets it unreachable."""
NEVER_DISPATCH = str(2**31)


def free_port(host: str) -> int:
    """A TCP port free on `host` now (SGLang binds the ports it is given, it cannot pick one)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def device_of(config: EngineConfig) -> tuple[str, int]:
    """SGLang's ``device`` and ``base_gpu_id`` for triptych's ``--device`` ("cuda:1" → 1)."""
    kind, _, index = config.device.partition(":")
    return kind, int(index) if index else 0


def server_args_kwargs(config: EngineConfig, role: Role, **ports: int) -> dict[str, Any]:
    """Keyword arguments of ``ServerArgs`` (and so of ``sglang.Engine``) for `role`.

    `ports` gives ``disaggregation_bootstrap_port`` (prefill) and ``encoder_bootstrap_port``
    (language roles) when the config leaves them to chance; see `resolve_ports`.
    """
    device, gpu = device_of(config)
    common: dict[str, Any] = {
        "model_path": config.model_path,
        "device": device,
        "base_gpu_id": gpu,
        "tp_size": 1,
        "host": config.bootstrap_host,
        "log_level": "warning",
    }
    if role == "encoder":
        cpu = device == "cpu"
        return {
            **common,
            "encoder_only": True,
            "encoder_transfer_backend": "zmq_to_tokenizer",
            "dtype": "float32" if cpu else "auto",
            **({"attention_backend": "torch_native"} if cpu else {}),
        }
    language: dict[str, Any] = {
        **common,
        "language_only": True,
        "encoder_transfer_backend": "zmq_to_tokenizer",
        "enable_adaptive_dispatch_to_encoder": True,
        "encoder_bootstrap_port": ports["encoder_bootstrap_port"],
        "disaggregation_mode": "null" if role == "agg" else role,
        "mem_fraction_static": config.mem_fraction_static,
        "max_running_requests": config.max_running_requests,
        "disable_cuda_graph": not config.cuda_graphs,
        "disable_radix_cache": not config.prefix_cache,
        # incremental outputs: each streamed chunk carries only the new token ids
        "incremental_streaming_output": True,
    }
    if role in ("prefill", "decode"):
        language["disaggregation_transfer_backend"] = "nixl"
    if role == "prefill":
        language["disaggregation_bootstrap_port"] = ports["disaggregation_bootstrap_port"]
    if config.max_model_len:
        language["context_length"] = config.max_model_len
    if config.kv_cache_tokens:
        language["max_total_tokens"] = config.kv_cache_tokens
    return language


def resolve_ports(config: EngineConfig, role: Role) -> dict[str, int]:
    """Concrete ports for the servers SGLang starts for `role` (free ones where unset)."""
    if role == "encoder":
        return {}
    ports = {"encoder_bootstrap_port": free_port(config.bootstrap_host)}
    if role == "prefill":
        ports["disaggregation_bootstrap_port"] = config.bootstrap_port or free_port(
            config.bootstrap_host
        )
    return ports


def server_args(config: EngineConfig, role: Role) -> Any:
    """SGLang's ``ServerArgs`` for `role`, validated by SGLang itself."""
    from sglang.srt.server_args import ServerArgs

    if role != "encoder":
        os.environ[DISPATCH_MIN_ITEMS_ENV] = NEVER_DISPATCH
    return ServerArgs(**server_args_kwargs(config, role, **resolve_ports(config, role)))
