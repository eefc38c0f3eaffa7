"""A NIXL export's wire form: `TensorRef` (transfer layer) <-> `TensorHandle` (protocol)."""

import dataclasses

from triptych.protocol import TensorHandle
from triptych.transfer.nixl import TensorRef


def to_handle(ref: TensorRef) -> TensorHandle:
    """The wire form of a NIXL export."""
    return TensorHandle(**dataclasses.asdict(ref))


def to_ref(handle: TensorHandle) -> TensorRef:
    """A NIXL reference from its wire form."""
    return TensorRef(**handle.model_dump())
