"""The service runtime: NATS connection, discovery, routing, streaming calls, cancellation.

A worker builds a `Runtime`, a `Service` with endpoints, and serves; a caller asks the runtime
for a `Client` of a component and `call`s (or `forward`s) typed requests.
"""

if __name__ != "triptych.runtime":  # the folder is reached only through the package
    raise ImportError(f"import triptych.runtime, not {__name__} (docs/architecture.md)")

from triptych.runtime.client import Client
from triptych.runtime.config import RuntimeConfig
from triptych.runtime.env import Env
from triptych.runtime.errors import ServiceError
from triptych.runtime.runtime import Runtime
from triptych.runtime.service import Context, Service
from triptych.runtime.stream import ResponseStream, StreamSink

__all__ = [
    "Client",
    "Context",
    "Env",
    "ResponseStream",
    "Runtime",
    "RuntimeConfig",
    "Service",
    "ServiceError",
    "StreamSink",
]
