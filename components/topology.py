"""The topologies: which workers serve which stages, and which component calls which.

Declared once here and read by the frontend (whom it calls first, which components must be
live), the workers (where encode sends, whom decode calls) and ``triptych serve`` and the
launch scripts (which worker processes to start, with which flags). Not a component: every
component may read it.

A request enters at the topology's entry component; encode forwards it to decode, the entry
point of disaggregation, which in E/P/D and P/D calls prefill and receives its KV cache.
"""

import argparse
from dataclasses import dataclass

ENCODE = "encode"
PREFILL = "prefill"
DECODE = "decode"

ENCODE_SENDS_TO = DECODE
"""The component an encode worker forwards each request to, with its embeddings."""
DECODE_CALLS = PREFILL
"""The component a decode worker in ``--disaggregation-mode decode`` calls for the KV cache."""
GENERATES = DECODE
"""The component whose instances stream the tokens: their capacity and their announced context
limit bound what the frontend lets in."""

DEDICATED_ENCODER = "--dedicated-mm-encoder"
"""The flag a worker is given when images arrive encoded from an encode worker."""


@dataclass(frozen=True)
class Worker:
    """One worker process of a topology."""

    name: str
    """Its process name in launchers' logs."""
    module: str
    """``triptych.components.<module>``."""
    args: tuple[str, ...]
    """The flags that make the module serve these stages."""
    gpu: str
    """The ``triptych serve`` flag (dest) that pins it to a GPU."""


@dataclass(frozen=True)
class Topology:
    """How the stages are grouped into workers, and where requests enter."""

    name: str
    components: tuple[str, ...]
    """Every component that must be live, the one the frontend calls first (the entry) first."""
    workers: tuple[Worker, ...]

    @property
    def entry(self) -> str:
        """The component the frontend calls first for requests with images or videos."""
        return self.components[0]

    @property
    def text_entry(self) -> str:
        """The component text-only requests enter at: past the encoder, when there is one."""
        return GENERATES if self.entry == ENCODE else self.entry


_ENCODE = Worker("encode", "encode_worker", (), "encode_gpu")
_DISAGGREGATED_DECODE = ("--disaggregation-mode", "decode")
_AGGREGATED = ("--disaggregation-mode", "agg")

TOPOLOGIES: dict[str, Topology] = {
    topology.name: topology
    for topology in (
        Topology(
            "E/P/D",
            (ENCODE, DECODE, PREFILL),
            (
                _ENCODE,
                Worker("prefill", "prefill_worker", (DEDICATED_ENCODER,), "prefill_gpu"),
                Worker(
                    "decode",
                    "decode_worker",
                    (*_DISAGGREGATED_DECODE, DEDICATED_ENCODER),
                    "decode_gpu",
                ),
            ),
        ),
        Topology(
            "E/PD",
            (ENCODE, DECODE),
            (
                _ENCODE,
                Worker("pd", "decode_worker", (*_AGGREGATED, DEDICATED_ENCODER), "decode_gpu"),
            ),
        ),
        Topology("EPD", (DECODE,), (Worker("worker", "decode_worker", _AGGREGATED, "decode_gpu"),)),
        Topology(
            "P/D",
            (DECODE, PREFILL),
            (
                Worker("prefill", "prefill_worker", (), "prefill_gpu"),
                Worker("decode", "decode_worker", _DISAGGREGATED_DECODE, "decode_gpu"),
            ),
        ),
    )
}
"""Every topology, by the name ``--topology`` takes."""


def add_topology_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--topology``: one of `TOPOLOGIES`, in either case."""
    parser.add_argument(
        "--topology",
        type=str.upper,
        choices=tuple(TOPOLOGIES),
        default="E/P/D",
        metavar="e/p/d|e/pd|epd|p/d",
        help=help,
    )
