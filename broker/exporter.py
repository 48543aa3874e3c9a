"""Prometheus export of the broker's metrics: a custom collector over ``PoolState.metrics_snapshot``
served by ``prometheus_client``'s HTTP server on a daemon thread of the broker process.

Nothing here runs on the broker's hot path: the state counts in plain data (``broker.metrics``) and
this module turns a copy of it into metric families only when Prometheus scrapes (every few seconds
at most). No multiprocess mode: the broker sees every request and every worker's report, remote
workers included, so one registry in one process holds it all.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

from modelpool.broker.metrics import HistogramSnapshot, ModelSnapshot

log = logging.getLogger(__name__)

PREFIX = "modelpool_"
LABELS = ("model", "version")


class MetricsError(RuntimeError):
    """The metrics endpoint cannot start (port in use, prometheus_client missing); says what to change."""


def _families() -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    return CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


# (name, help, value of a snapshot) of the plain per-model counters and gauges.
_COUNTERS = (
    ("request_success", "Requests answered 200 (Triton: nv_inference_request_success)", lambda s: s.success),
    ("worker_restarts", "Local worker processes that exited and were restarted by the launcher",
     lambda s: s.restarts),
    ("replica_load_failures", "Replicas that failed to load the model", lambda s: s.load_failures),
    ("requests_retried", "Requests sent again to another replica after a worker died", lambda s: s.retried),
)
_GAUGES = (
    ("pending_requests", "Requests waiting in the broker's queue, not yet sent to a worker "
     "(Triton: nv_inference_pending_request_count)", lambda s: s.pending),
    ("inflight_requests", "Requests sent to workers and not answered yet", lambda s: s.in_flight),
    ("queue_bytes", "Payload bytes of the model's requests the broker holds, queued or in flight",
     lambda s: s.queue_bytes),
    ("replicas_expected", "Local replicas the launcher keeps alive", lambda s: s.replicas_expected),
    ("model_load_duration_seconds", "Seconds the last replica to register took to load and warm up the model "
     "(Triton: nv_model_load_duration_secs)", lambda s: s.load_seconds),
    ("worker_memory_bytes", "Resident memory of the model's registered workers, summed", lambda s: s.memory_bytes),
)
# (name, help, histogram key in ModelSnapshot.histograms)
_HISTOGRAMS = (
    ("queue_duration_seconds", "Seconds from admission (or re-queueing after a worker died) to dispatch to a "
     "worker, per request (Triton: nv_inference_queue_duration_us)", "queue_seconds"),
    ("compute_duration_seconds", "Seconds per model call, as the worker measured it "
     "(Triton: nv_inference_compute_infer_duration_us)", "compute_seconds"),
    ("batch_size", "Rows per model call (Triton: nv_inference_count / nv_inference_exec_count)", "batch_rows"),
)


class PoolCollector:
    """Renders ``snapshot()`` (a list of ModelSnapshot) as metric families on each scrape."""

    def __init__(self, snapshot: Callable[[], Sequence[ModelSnapshot]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list:
        return []  # no collect() at registration: the families are known only from the snapshot

    def collect(self) -> Iterable[Any]:
        models = self.snapshot()
        yield from self._counters(models)
        yield from self._gauges(models)
        yield from self._histograms(models)

    def _counters(self, models: Sequence[ModelSnapshot]) -> Iterable[Any]:
        counter, _, _ = _families()
        for name, doc, value in _COUNTERS:
            family = counter(PREFIX + name, doc, labels=LABELS)
            for s in models:
                family.add_metric([s.name, s.version], value(s))
            yield family
        failures = counter(PREFIX + "request_failure", "Requests answered with an error, by reason "
                           "(Triton: nv_inference_request_failure)", labels=(*LABELS, "reason"))
        inferences = counter(PREFIX + "inferences", "Rows the model ran, summed over its calls "
                             "(Triton: nv_inference_count)", labels=LABELS)
        executions = counter(PREFIX + "executions", "Model calls (batches) the workers ran "
                             "(Triton: nv_inference_exec_count)", labels=LABELS)
        for s in models:
            for reason, count in s.failures.items():
                failures.add_metric([s.name, s.version, reason], count)
            batch = s.histograms["batch_rows"]
            inferences.add_metric([s.name, s.version], batch.sum)
            executions.add_metric([s.name, s.version], batch.count)
        yield from (failures, inferences, executions)

    def _gauges(self, models: Sequence[ModelSnapshot]) -> Iterable[Any]:
        _, gauge, _ = _families()
        for name, doc, value in _GAUGES:
            family = gauge(PREFIX + name, doc, labels=LABELS)
            for s in models:
                number = value(s)
                if number is not None:  # not known yet (no worker has said): no sample rather than a 0
                    family.add_metric([s.name, s.version], number)
            yield family
        replicas = gauge(PREFIX + "replicas", "Replicas by state: ready (registered, local or remote) and "
                         "starting (process up, not ready yet)", labels=(*LABELS, "state"))
        for s in models:
            replicas.add_metric([s.name, s.version, "ready"], s.replicas_ready)
            replicas.add_metric([s.name, s.version, "starting"], s.replicas_starting)
        yield replicas

    def _histograms(self, models: Sequence[ModelSnapshot]) -> Iterable[Any]:
        _, _, histogram = _families()
        requests = histogram(PREFIX + "request_duration_seconds", "Seconds from admission to the reply, per "
                             "request admitted to the queue, by outcome (success: 200; failure: any error) "
                             "(Triton: nv_inference_request_duration_us)", labels=(*LABELS, "outcome"))
        for s in models:
            for outcome, key in (("success", "request_seconds"), ("failure", "failed_request_seconds")):
                _add_histogram(requests, [s.name, s.version, outcome], s.histograms[key])
        yield requests
        for name, doc, key in _HISTOGRAMS:
            family = histogram(PREFIX + name, doc, labels=LABELS)
            for s in models:
                _add_histogram(family, [s.name, s.version], s.histograms[key])
            yield family


def _add_histogram(family: Any, labels: list[str], h: HistogramSnapshot) -> None:
    from prometheus_client.utils import floatToGoString

    buckets = [("+Inf" if math.isinf(bound) else floatToGoString(bound), count) for bound, count in h.cumulative()]
    family.add_metric(labels, buckets, sum_value=h.sum)


class MetricsServer:
    """The HTTP endpoint serving one registry: our collector and the broker process's own figures."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Sequence[ModelSnapshot]]) -> None:
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
        except ImportError:
            raise MetricsError("prometheus_client is not installed: install the server extra "
                               "(pip install 'modelpool[server]'), or start with --metrics-port off") from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PoolCollector(snapshot))
        # The broker's own CPU and memory (process_cpu_seconds_total, ...): its per-request cost is what
        # limits a pool's throughput, so it is worth a dashboard line. No gc/platform collectors.
        ProcessCollector(registry=self.registry)
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {host} port {port}: {exc.strerror or exc}; choose another "
                "port with --metrics-port PORT (or [metrics] port in the config), or --metrics-port off") from None
        self.host, self.port = host, self.server.server_port  # the port chosen when asked for 0
        log.info("metrics on %s", self.url)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)
