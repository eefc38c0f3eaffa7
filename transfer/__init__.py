"""Moving state between workers: bootstrap rooms for the KV hand-off, NIXL for the bytes."""

if __name__ != "triptych.transfer":  # the folder is reached only through the package
    raise ImportError(f"import triptych.transfer, not {__name__} (docs/architecture.md)")

from triptych.transfer import image_bytes
from triptych.transfer.bootstrap import BootstrapClient, BootstrapServer, PrefillRoom
from triptych.transfer.embeddings import EmbeddingTransport, ImageEmbeddings
from triptych.transfer.nixl import PoolFull, TransferAgent, TransferError

__all__ = [
    "BootstrapClient",
    "BootstrapServer",
    "EmbeddingTransport",
    "ImageEmbeddings",
    "PoolFull",
    "PrefillRoom",
    "TransferAgent",
    "TransferError",
    "image_bytes",
]
