"""The broker's metrics as plain data: counters and fixed-bucket histograms per model.

No locks, no sockets, no prometheus_client: ``broker.state`` updates these where it already counts
(admission, dispatch, replies), at the cost of a ``bisect`` and two additions per observation, so the
hot path stays cheap. On a scrape, ``broker.exporter`` renders a copy of them (``ModelSnapshot``) in
the Prometheus text format; ``mmi.models`` and ``mmi.metrics`` give the same numbers to clients, and
``modelpool status`` reads them back from there (``HistogramSnapshot.quantile``).

A histogram's bucket ``i`` counts the observations ``v`` with ``bounds[i - 1] < v <= bounds[i]``
(Prometheus' ``le``); the last bucket, past every bound, is ``+Inf``. Counts are kept per bucket and
made cumulative only for export.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from typing import Any, Mapping, NamedTuple, Sequence

from modelpool.client.errors import PoolError, WorkerCrashed

# Seconds: 100 us (a queue that does not wait) to a minute (a hung model's hang_timeout).
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Rows per model call: powers of two up to the largest batch a worker may announce (65,536).
BATCH_BUCKETS = tuple(float(1 << i) for i in range(17))

# Why a request failed: the `reason` label of modelpool_request_failure_total. Indices into
# ModelMetrics.failures; CLIENT_REASONS are the 4xx ones (the client's request was refused).
REASONS = ("invalid_input", "queue_full", "model_error", "worker_crashed", "unavailable", "timeout")
INVALID_INPUT, QUEUE_FULL, MODEL_ERROR, WORKER_CRASHED, UNAVAILABLE, TIMEOUT = range(len(REASONS))
CLIENT_REASONS = (INVALID_INPUT, QUEUE_FULL)
_REASON_BY_STATUS = {b"400": INVALID_INPUT, b"429": QUEUE_FULL, b"500": MODEL_ERROR, b"503": UNAVAILABLE,
                     b"504": TIMEOUT}


def reason_of_status(status: bytes) -> int:
    """The failure reason of an error status (a worker's reply): another 4xx is invalid_input, and
    any other status a worker sends (501, a non-200 2xx) is model_error."""
    reason = _REASON_BY_STATUS.get(status)
    if reason is None:
        return INVALID_INPUT if status[:1] == b"4" else MODEL_ERROR
    return reason


def reason_of_error(error: PoolError) -> int:
    """The failure reason of an error the broker answers itself."""
    if isinstance(error, WorkerCrashed):
        return WORKER_CRASHED
    return reason_of_status(error.status)


class Histogram:
    """Fixed buckets: a count per bucket (the last one +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(not math.isfinite(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be finite and strictly increasing, got {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (bisect_left: a value equal to a bound falls in that bound's bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> HistogramSnapshot:
        """A copy, safe to read while the broker's loop goes on counting."""
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


class HistogramSnapshot(NamedTuple):
    """A histogram's numbers at one moment: bounds, per-bucket counts (+Inf last) and sum."""

    bounds: tuple
    counts: tuple
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last: Prometheus' ``_bucket`` series."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            total += count
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """Estimate as Prometheus' histogram_quantile does (linear within the bucket); None if empty.

        A quantile in the +Inf bucket is reported as the largest bound.
        """
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, count in enumerate(self.counts):
            if count and seen + count >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lower = self.bounds[i - 1] if i else 0.0
                return lower + (self.bounds[i] - lower) * max(0.0, rank - seen) / count
            seen += count
        return self.bounds[-1]

    def minus(self, earlier: HistogramSnapshot) -> HistogramSnapshot:
        """What was observed since ``earlier`` (the same histogram); a reset (fewer counts) gives self."""
        if earlier.bounds != self.bounds or any(a < b for a, b in zip(self.counts, earlier.counts)):
            return self
        return HistogramSnapshot(self.bounds, tuple(a - b for a, b in zip(self.counts, earlier.counts)),
                                 self.sum - earlier.sum)

    def to_wire(self) -> dict:
        """The map ``mmi.metrics`` sends: {"le": bounds, "counts": per bucket, +Inf last, "sum"}."""
        return {"le": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_wire(cls, value: Any) -> HistogramSnapshot:
        """Read back a ``to_wire`` map; ValueError if it is not one."""
        if not isinstance(value, Mapping):
            raise ValueError("a histogram must be a map")
        bounds, counts, total = value.get("le"), value.get("counts"), value.get("sum")
        numbers = isinstance(bounds, list) and all(_is_number(b) for b in bounds)
        ints = isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                for c in counts)
        if not numbers or not ints or len(counts) != len(bounds) + 1 or not _is_number(total):
            raise ValueError("a histogram needs numeric le, one count more than le, and a numeric sum")
        return cls(tuple(float(b) for b in bounds), tuple(counts), float(total))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ModelMetrics:
    """One model's counters and histograms, as ``broker.state`` counts them.

    - request_ok / request_failed: admission to the reply, per outcome, for every request that was
      admitted to the queue (refusals at admission are counted in ``failures`` only: they never waited);
    - queue: admission (or re-queueing after a worker died) to dispatch, per request sent to a worker;
    - compute / batch: per model call a worker reports (seconds, rows), from its REPLIES.
    """

    __slots__ = ("success", "failures", "request_ok", "request_failed", "queue", "compute", "batch", "restarts",
                 "last_call_ms")

    def __init__(self) -> None:
        self.success = 0
        self.failures = [0] * len(REASONS)
        self.request_ok = Histogram(DURATION_BUCKETS)
        self.request_failed = Histogram(DURATION_BUCKETS)
        self.queue = Histogram(DURATION_BUCKETS)
        self.compute = Histogram(DURATION_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.restarts = 0  # local worker processes that exited and were restarted by the launcher
        self.last_call_ms = 0  # Unix time in ms when the broker last heard of a model call (0: never)

    def succeeded(self, seconds: float) -> None:
        """A request answered 200, ``seconds`` after its admission."""
        self.success += 1
        h = self.request_ok  # Histogram.observe inlined: once per request
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.sum += seconds

    def failed(self, reason: int, seconds: float | None = None) -> None:
        """A request answered with an error; ``seconds`` since admission, None if refused at admission."""
        self.failures[reason] += 1
        if seconds is not None:
            self.request_failed.observe(seconds)

    def executed(self, calls: Sequence[Sequence[int]]) -> None:
        """A worker ran these model calls, each ``[rows, microseconds]`` (a REPLIES' stats)."""
        compute, batch = self.compute, self.batch  # Histogram.observe inlined: once per call
        compute_counts, compute_bounds = compute.counts, compute.bounds
        batch_counts, batch_bounds = batch.counts, batch.bounds
        seconds_sum, rows_sum = compute.sum, batch.sum
        for rows, micros in calls:
            seconds = micros * 1e-6
            compute_counts[bisect_left(compute_bounds, seconds)] += 1
            batch_counts[bisect_left(batch_bounds, rows)] += 1
            seconds_sum += seconds
            rows_sum += rows
        compute.sum, batch.sum = seconds_sum, rows_sum
        if calls:
            self.last_call_ms = time.time_ns() // 1_000_000

    @property
    def failed_total(self) -> int:
        return sum(self.failures)

    @property
    def client_errors(self) -> int:
        """Requests answered 4xx: refused as bad or over the queue limit."""
        return sum(self.failures[r] for r in CLIENT_REASONS)

    @property
    def errors(self) -> int:
        """Requests answered 5xx: the model or the pool failed them."""
        return self.failed_total - self.client_errors

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """Copies of every histogram by its ``mmi.metrics`` name."""
        return {"request_seconds": self.request_ok.snapshot(), "failed_request_seconds": self.request_failed.snapshot(),
                "queue_seconds": self.queue.snapshot(), "compute_seconds": self.compute.snapshot(),
                "batch_rows": self.batch.snapshot()}


class ModelSnapshot(NamedTuple):
    """Everything exported about one model at one moment (built by ``ModelEntry.snapshot``)."""

    name: str
    version: str
    success: int
    failures: dict  # reason name -> count, every reason present
    histograms: dict  # mmi.metrics name -> HistogramSnapshot
    pending: int  # requests waiting in the broker
    in_flight: int  # requests sent to workers, not answered
    queue_bytes: int
    replicas_ready: int
    replicas_starting: int
    replicas_expected: int
    load_failures: int
    restarts: int
    retried: int
    load_seconds: float | None  # the last READY's load time
    memory_bytes: int | None  # resident memory of the model's registered workers, summed; None if none said
