"""Prometheus metrics of a real pool (issue 14): a known number of requests through the real Client,
then /metrics scraped over HTTP must say exactly that; a 429 and a 504 land under their reasons;
compute time and batch sizes come from the workers and agree with what the broker sent."""
from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from modelpool import cli
from modelpool.client import protocol
from poolutil import Pool, wait_until

pytestmark = pytest.mark.timeout(300)

SLEEP = 1.5  # seconds the sleepy model holds its only worker


@pytest.fixture(scope="module")
def mpool(models):
    p = Pool([{"name": "a", "path": str(models.a), "max_batch_size": 8},
              {"name": "sleepy", "path": str(models.sleepy), "imports": ["custom_layers"], "max_batch_size": 1,
               "prefetch": 0, "max_queue": 1}])
    yield p
    assert p.stop() == 0, p.read_log()


def scrape(pool: Pool) -> dict:
    """{(sample name, frozenset of labels): value} from the pool's /metrics."""
    with urllib.request.urlopen(pool.metrics_url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_scraped_counters_and_histograms_equal_the_requests_sent(mpool):
    assert f"metrics on {mpool.metrics_url}" in mpool.read_log()  # `modelpool serve` says where
    rng = np.random.default_rng(3)
    sizes = [1 + i % 3 for i in range(24)]  # 48 rows in 24 requests
    xs = [rng.normal(size=(n, 8)).astype("float32") for n in sizes]
    for x in xs[:8]:  # one at a time
        assert mpool.client.predict("a", x).shape == (len(x), 4)
    results = mpool.client.predict_many("a", xs[8:])  # pipelined: batches of several requests
    assert [len(r) for r in results] == sizes[8:]
    labels = {"model": "a", "version": "1"}

    def reported() -> tuple[dict, dict] | None:
        """The worker reports its model calls at most every 10 ms: wait for the last ones."""
        samples, a = scrape(mpool), mpool.models()["a"]
        return (samples, a) if value(samples, "modelpool_executions_total", **labels) == a["batches"] else None

    samples, a = wait_until(reported, 10.0, what="executions equal to the batches sent")
    assert value(samples, "modelpool_request_success_total", **labels) == 24 == a["success"] == a["served"]
    for reason in ("invalid_input", "queue_full", "model_error", "worker_crashed", "unavailable", "timeout"):
        assert value(samples, "modelpool_request_failure_total", reason=reason, **labels) == 0
    assert value(samples, "modelpool_request_duration_seconds_count", outcome="success", **labels) == 24
    assert value(samples, "modelpool_request_duration_seconds_bucket", outcome="success", le="+Inf", **labels) == 24
    assert value(samples, "modelpool_request_duration_seconds_count", outcome="failure", **labels) == 0
    assert value(samples, "modelpool_queue_duration_seconds_count", **labels) == 24 == a["dispatched"]
    assert value(samples, "modelpool_queue_duration_seconds_sum", **labels) == pytest.approx(a["queue_seconds"],
                                                                                            abs=1e-5)
    # each BATCH the broker sent ran as one model call: the workers' reports agree with the broker
    executions = value(samples, "modelpool_executions_total", **labels)
    assert executions == value(samples, "modelpool_compute_duration_seconds_count", **labels)
    assert executions == value(samples, "modelpool_batch_size_count", **labels) == a["batches"] == a["executions"]
    assert 8 + 32 / 8 <= executions <= 24  # 8 single calls, then 32 rows in calls of at most 8
    assert value(samples, "modelpool_inferences_total", **labels) == 48 == a["batch_rows"] == a["inferences"]
    assert value(samples, "modelpool_batch_size_sum", **labels) == 48
    assert value(samples, "modelpool_batch_size_bucket", le="1.0", **labels) < executions
    compute = value(samples, "modelpool_compute_duration_seconds_sum", **labels)
    assert 0 < compute == pytest.approx(a["compute_seconds"], abs=1e-5)
    assert compute < value(samples, "modelpool_request_duration_seconds_sum", outcome="success", **labels)
    assert value(samples, "modelpool_replicas", state="ready", **labels) == 1 == a["replicas_ready"]
    assert value(samples, "modelpool_replicas", state="starting", **labels) == 0
    assert value(samples, "modelpool_replicas_expected", **labels) == 1
    assert value(samples, "modelpool_pending_requests", **labels) == 0
    assert value(samples, "modelpool_inflight_requests", **labels) == 0
    memory = value(samples, "modelpool_worker_memory_bytes", **labels)
    assert 50 << 20 < memory == a["memory_bytes"] < 8 << 30  # a TensorFlow process: tens of MB to a few GB
    assert 0 < value(samples, "modelpool_model_load_duration_seconds", **labels) == a["load_seconds"]
    assert value(samples, "modelpool_worker_restarts_total", **labels) == 0
    assert value(samples, "process_cpu_seconds_total") > 0  # the broker's own CPU


def _send(sock: zmq.Socket, rid: bytes, seconds: float = 0.0, **header) -> None:
    x = np.zeros((1, 8), "float32")
    x[0, 1] = seconds  # the Sleep layer sleeps this long
    metas, frames = protocol.encode_tensors({"x": x})
    sock.send_multipart(protocol.encode_request("sleepy", rid, {"inputs": metas, **header}, frames))


def test_a_429_and_a_504_show_up_under_their_reasons(mpool):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(mpool.endpoint)
    try:
        _send(sock, b"slow", SLEEP)
        wait_until(lambda: mpool.models()["sleepy"]["in_flight"] == 1, 10.0, what="the slow request running")
        _send(sock, b"late", timeout_ms=300)  # waits in the queue (max_queue = 1), expires there
        _send(sock, b"refused")  # the queue is full
        replies = {}
        deadline = time.monotonic() + 30
        while len(replies) < 3:
            assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), replies
            reply = protocol.parse_reply(sock.recv_multipart())
            replies[reply.rid] = reply.status
    finally:
        sock.close(linger=0)
    assert replies == {b"slow": b"200", b"late": b"504", b"refused": b"429"}
    samples = scrape(mpool)
    labels = {"model": "sleepy", "version": "1"}
    assert value(samples, "modelpool_request_failure_total", reason="queue_full", **labels) == 1
    assert value(samples, "modelpool_request_failure_total", reason="timeout", **labels) == 1
    assert value(samples, "modelpool_request_success_total", **labels) == 1
    # the 504 waited about 300 ms from its admission; the refusal never waited
    assert value(samples, "modelpool_request_duration_seconds_count", outcome="failure", **labels) == 1
    assert 0.29 < value(samples, "modelpool_request_duration_seconds_sum", outcome="failure", **labels) < SLEEP
    wait_until(lambda: value(scrape(mpool), "modelpool_executions_total", **labels) == 1, 10.0,
               what="the slow call reported")
    samples = scrape(mpool)
    assert value(samples, "modelpool_compute_duration_seconds_sum", **labels) >= SLEEP * 0.9
    assert value(samples, "modelpool_compute_duration_seconds_bucket", le="1.0", **labels) == 0
    summary = mpool.models()["sleepy"]
    assert summary["failures"]["queue_full"] == 1 and summary["failures"]["timeout"] == 1
    assert (summary["client_errors"], summary["errors"], summary["expired"]) == (1, 1, 1)


def test_status_shows_request_rate_and_queue_p50(mpool, capsys):
    mpool.client.predict("a", np.zeros((2, 8), "float32"))
    assert cli.main(["status", "--endpoint", mpool.endpoint]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"pool at {mpool.endpoint}; rates since the broker started ")
    assert "REQ/S" in lines[1] and "QUEUE P50" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    rate, p50 = rows["a"][8], rows["a"][9]  # IN FLIGHT and QUEUE P50: two words of the heading, one cell
    assert float(rate) > 0 and p50.endswith(("us", "ms")), rows["a"]


def test_a_killed_worker_counts_one_restart_and_the_replicas_gauge_follows(mpool):
    import os
    import signal

    (pid,) = mpool.worker_pids("a")
    os.kill(pid, signal.SIGKILL)
    labels = {"model": "a", "version": "1"}
    wait_until(lambda: value(scrape(mpool), "modelpool_worker_restarts_total", **labels) == 1, 30.0,
               what="the restart counted")
    wait_until(lambda: value(scrape(mpool), "modelpool_replicas", state="ready", **labels) == 1
               and mpool.worker_pids("a") not in ([], [pid]), 120.0, what="a new replica ready")
    samples = scrape(mpool)
    assert value(samples, "modelpool_worker_restarts_total", **labels) == 1
    assert value(samples, "modelpool_worker_memory_bytes", **labels) > 0  # the new worker's, from its READY
