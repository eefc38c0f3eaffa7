"""A worker's share of its GPU: ``--mem-fraction-static`` caps what its process may allocate.

Several workers share one GPU (say two encoders and a prefill on GPU 0) when each stays within
its budget. The decode worker's KV cache is sized from the budget already; the cap makes every
other allocation of the process (weights, activations, an encoder's batch) keep to it too, so
one worker running over its share fails alone, with an out-of-memory error naming its budget,
instead of starving its neighbours.
"""

import logging

from triptych.engines.registry import EngineConfig

log = logging.getLogger(__name__)


def limit_device_memory(config: EngineConfig) -> bool:
    """Cap this process's CUDA allocations on `config.device` at `config.mem_fraction_static`
    of its memory, where an ``hf`` engine runs in it (SGLang keeps to its own budget).

    Returns whether a cap was set (only on CUDA devices; CPU memory is not capped).
    """
    device, fraction = config.device, config.mem_fraction_static
    if "hf" not in (config.name, config.encode_name or config.name):
        return False
    if not device.startswith("cuda"):
        return False
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--mem-fraction-static must be in (0, 1], got {fraction}")
    import torch

    target = torch.device(device)
    if target.index is None:  # "cuda": the current device
        target = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_per_process_memory_fraction(fraction, target)
    total = torch.cuda.get_device_properties(target).total_memory
    log.info(
        "memory budget on %s: %.2f of %.1f GiB (--mem-fraction-static)",
        device,
        fraction,
        total * fraction / 2**30,
    )
    return True
