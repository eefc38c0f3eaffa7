"""How calls and stream frames are laid out on NATS: subjects and headers.

A call is a NATS request to one instance's subject; the instance acknowledges it at once (or
the server answers "no responders"), and the response frames then go to the subject named in
``Triptych-Stream-To``, which may belong to a process further up the pipeline (decode streams
straight to the frontend). A frame is data (no headers), data that ends the stream
(``Triptych-End``), an error (the NATS micro error headers, body an `ErrorInfo`), or a
keepalive that proves the holder of the stream is alive.
"""

REQUEST_ID = "Triptych-Request-Id"
STREAM_TO = "Triptych-Stream-To"
DEADLINE = "Triptych-Deadline"
INSTANCE = "Triptych-Instance"
END = "Triptych-End"
KEEPALIVE = "Triptych-Keepalive"
ERROR = "Nats-Service-Error"
ERROR_CODE = "Nats-Service-Error-Code"

MAX_MODEL_LEN = "max_model_len"
"""Discovery metadata: tokens one sequence may hold on the instance, prompt included (decode
and aggregated workers announce it; the frontend refuses longer requests before they travel)."""

END_HEADERS = {END: "1"}
KEEPALIVE_HEADERS = {KEEPALIVE: "1"}


def service_name(namespace: str, component: str) -> str:
    """NATS micro service name shared by every instance of a component."""
    return f"{namespace}-{component}"


def endpoint_subject(namespace: str, component: str, endpoint: str, instance: str) -> str:
    """The subject one instance serves an endpoint on."""
    return f"{namespace}.{component}.{endpoint}.{instance}"


def cancel_subject(namespace: str) -> str:
    """Every worker listens here; the body is the id of the request to cancel."""
    return f"{namespace}.cancel"


def stream_prefix(namespace: str, process_id: str) -> str:
    """Prefix of the subjects on which one process receives response streams."""
    return f"{namespace}.stream.{process_id}"


def ping_subject(namespace: str, component: str) -> str:
    """NATS micro PING subject of every instance of a component."""
    return f"$SRV.PING.{service_name(namespace, component)}"
