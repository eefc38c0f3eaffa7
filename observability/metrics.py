"""Prometheus metrics, all ``triptych_``-prefixed; one registry per process.

The frontend serves them on ``/metrics`` (the sum over its processes, `merge`); every worker on
its own small HTTP port (with ``/health`` and ``/ready``). Units are in the names; counters end
in ``_total``.
"""

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_GAP = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
COUNTS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)


class LoopHistogram(Collector):
    """A histogram without labels that one thread (an event loop's) updates: no lock per
    observation, where prometheus_client's takes two. For the per-token path."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = [*buckets, math.inf]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


class LoopCounter(Collector):
    """A counter without labels that one thread (an event loop's) increments: no lock."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name, self._documentation = name.removesuffix("_total"), documentation
        self._value = 0.0
        REGISTRY.register(self)

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._value)


# frontend (the label-less ones are updated on its event loop only)
REQUESTS = Counter(
    "triptych_frontend_requests_total",
    "HTTP requests by endpoint and status",
    ["endpoint", "status"],
)
IN_FLIGHT = Gauge("triptych_frontend_requests_in_flight", "Chat requests being served")
TTFT = LoopHistogram(
    "triptych_frontend_time_to_first_token_seconds",
    "Request arrival to the first streamed token",
    buckets=LATENCY,
)
ITL = LoopHistogram(
    "triptych_frontend_inter_token_latency_seconds",
    "Time between consecutive token chunks",
    buckets=TOKEN_GAP,
)
DURATION = LoopHistogram(
    "triptych_frontend_request_duration_seconds",
    "Request arrival to its last byte",
    buckets=LATENCY,
)
INPUT_TOKENS = LoopCounter("triptych_frontend_input_tokens_total", "Prompt tokens")
OUTPUT_TOKENS = LoopCounter("triptych_frontend_output_tokens_total", "Generated tokens")
IMAGES = LoopHistogram("triptych_frontend_images_per_request", "Images per request", buckets=COUNTS)
IMAGE_TOKENS = LoopHistogram(
    "triptych_frontend_image_tokens_per_request",
    "Image placeholder tokens per request",
    buckets=TOKENS,
)
IMAGE_DECODE = Histogram(
    "triptych_frontend_image_decode_seconds",
    "CPU time the frontend spent decoding one image and digesting its pixels (a worker thread's)",
    buckets=LATENCY,
)
VIDEOS = LoopHistogram("triptych_frontend_videos_per_request", "Videos per request", buckets=COUNTS)
VIDEO_FRAMES = LoopCounter(
    "triptych_frontend_video_frames_total", "Video frames sampled for the vision tower"
)
VIDEO_TOKENS = LoopHistogram(
    "triptych_frontend_video_tokens_per_request",
    "Video placeholder tokens per request with videos",
    buckets=TOKENS,
)
VIDEOS_REJECTED = Counter(
    "triptych_frontend_videos_rejected_total",
    "Videos refused with a 400: unreachable, unreadable or over a limit",
)
DISCONNECTS = Counter(
    "triptych_frontend_client_disconnects_total", "Requests whose client went away before the end"
)

# every worker
MIGRATIONS = Counter(
    "triptych_frontend_migrations_total",
    "Requests sent again to another instance after the one holding them failed before the "
    "first token",
)
REJECTED = Counter(
    "triptych_frontend_rejected_total",
    "Requests refused for load (503 with Retry-After)",
    ["reason"],
)
STAGE_DURATION = Histogram(
    "triptych_stage_request_duration_seconds",
    "Time a stage spent on a request",
    ["stage", "outcome"],
    buckets=LATENCY,
)
STAGE_IN_FLIGHT = Gauge(
    "triptych_stage_requests_in_flight", "Requests a stage holds now", ["stage"]
)
RESPONSE_STREAMS = Counter(
    "triptych_stage_response_streams_total",
    "Response streams a stage took, by the path their frames take to the caller",
    ["stage", "path"],
)

# encode
ENCODE_DURATION = Histogram(
    "triptych_encode_duration_seconds", "Vision tower time per batch", buckets=LATENCY
)
ENCODE_BATCH = Histogram(
    "triptych_encode_batch_size", "Images and videos per vision-tower batch", buckets=COUNTS
)
IMAGES_ENCODED = Counter("triptych_encode_images_total", "Images encoded")
VIDEOS_ENCODED = Counter("triptych_encode_videos_total", "Videos encoded")
VIDEO_FRAMES_ENCODED = Counter(
    "triptych_encode_video_frames_total", "Video frames through the vision tower"
)
ENCODE_CACHE_HITS = Counter(
    "triptych_encode_cache_hits_total",
    "Images whose embeddings came from the encoder's cache (no vision-tower forward)",
)
ENCODE_CACHE_MISSES = Counter(
    "triptych_encode_cache_misses_total",
    "Images looked up in the encoder's cache and not found (encoded, then cached)",
)
ENCODE_CACHE_BYTES = Gauge(
    "triptych_encode_cache_bytes", "Bytes of image embeddings the encoder's cache holds"
)
ENCODE_CACHE_CAPACITY = Gauge(
    "triptych_encode_cache_capacity_bytes",
    "Bound of the encoder's embedding cache (--embedding-cache-bytes)",
)

# transfers (kind: embedding | kv | image | video; outcome: ok | error)
TRANSFER_BYTES = Counter(
    "triptych_transfer_bytes_total", "Bytes read over NIXL", ["kind", "outcome"]
)
TRANSFER_DURATION = Histogram(
    "triptych_transfer_duration_seconds", "NIXL read time", ["kind", "outcome"], buckets=LATENCY
)
POOL_IN_USE = Gauge(
    "triptych_transfer_pool_bytes_in_use", "Registered transfer memory held by exports and reads"
)

# prefill and decode (model engines)
QUEUE_DEPTH = Gauge("triptych_engine_queue_depth", "Requests waiting for the model", ["stage"])
RUNNING = Gauge("triptych_engine_running_requests", "Sequences in the decode batch", ["stage"])
BATCH_SIZE = Histogram(
    "triptych_engine_batch_size", "Sequences per decode step", ["stage"], buckets=COUNTS
)
KV_BYTES = Gauge("triptych_engine_kv_cache_bytes", "KV cache memory held", ["stage"])
KV_CAPACITY = Gauge(
    "triptych_engine_kv_cache_capacity_bytes", "KV cache memory allocated", ["stage"]
)
KV_CAPACITY_TOKENS = Gauge(
    "triptych_engine_kv_cache_capacity_tokens", "Token positions the KV cache holds", ["stage"]
)
PREFIX_CACHE_QUERIED = Counter(
    "triptych_prefix_cache_queried_tokens_total",
    "Prompt tokens looked up in the engine's prefix cache",
    ["stage"],
)
PREFIX_CACHE_HITS = Counter(
    "triptych_prefix_cache_hit_tokens_total",
    "Prompt tokens whose KV cache came from the prefix cache (not computed again)",
    ["stage"],
)
TOKENS_PROCESSED = Counter("triptych_engine_tokens_total", "Tokens processed", ["stage", "phase"])

# load (every worker: its model's figures over the last 10 s, from engines/load.py's meter)
STAGE_QUEUE_DEPTH = Gauge(
    "triptych_stage_queue_depth", "Requests waiting for this worker's model", ["stage"]
)
STAGE_BUSY_FRACTION = Gauge(
    "triptych_stage_busy_fraction",
    "Share of the last 10 s this worker's model thread was busy, by kind of work",
    ["stage", "work"],
)
STAGE_IMAGES_PER_S = Gauge(
    "triptych_stage_images_per_second", "Images encoded per second (last 10 s)", ["stage"]
)
STAGE_TOKENS_PER_S = Gauge(
    "triptych_stage_tokens_per_second",
    "Tokens processed per second (last 10 s): prompt tokens prefilled, output tokens decoded",
    ["stage", "phase"],
)


_SAME_IN_EVERY_PROCESS: dict[str, Callable[[Iterable[float]], float]] = {
    "python_info": max,
    "process_start_time_seconds": min,
    "process_max_fds": min,
}
"""Samples that describe one process rather than count for it: the group's is not a sum."""


def merge(expositions: Sequence[bytes]) -> bytes:
    """Several processes' Prometheus text as one process's: counters, histograms and gauges
    added up sample by sample (requests, tokens, in-flight requests, CPU seconds, memory);
    creation times and start times the earliest."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = []
                    merged.add_sample(sample.name, sample.labels, 0.0)
                values[key].append(sample.value)
    for family in families.values():
        for index, sample in enumerate(family.samples):
            seen = values[(sample.name, tuple(sorted(sample.labels.items())))]
            combine = _SAME_IN_EVERY_PROCESS.get(sample.name)
            if combine is None and sample.name.endswith("_created"):
                combine = min
            family.samples[index] = sample._replace(value=(combine or sum)(seen))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
