"""Moving state between workers: the bootstrap rooms of the KV hand-off (and NIXL agents)."""

from triptych.transfer.bootstrap import BootstrapClient, BootstrapServer, RoomSlot
from triptych.transfer.embeddings import ImageEmbeddings, publish_simulated, read_simulated

__all__ = [
    "BootstrapClient",
    "BootstrapServer",
    "ImageEmbeddings",
    "RoomSlot",
    "publish_simulated",
    "read_simulated",
]
