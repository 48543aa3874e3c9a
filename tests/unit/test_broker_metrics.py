"""Metrics (issue 14): bucket math, what broker.state counts (fake clock), the Prometheus text a scrape
returns, the [metrics] config, and the endpoint itself on a loopback port (no TensorFlow, no workers)."""
from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelpool.broker import config as pool_config
from modelpool.broker.config import ConfigError, MetricsConfig, ModelConfig, PoolConfig
from modelpool.broker.exporter import MetricsError, MetricsServer, PoolCollector
from modelpool.broker.metrics import (
    BATCH_BUCKETS,
    DURATION_BUCKETS,
    REASONS,
    Histogram,
    HistogramSnapshot,
    ModelMetrics,
    reason_of_error,
    reason_of_status,
)
from modelpool.broker.state import PoolState
from modelpool.client import errors, protocol
from test_state import ALICE, BOB, W1, W2, Clock, client_out, dispatched, infer, only_error

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pool(clock: Clock, max_queue: int = 1024) -> PoolState:
    state = PoolState(now=clock, heartbeat_interval=1.0, heartbeat_liveness=3, hang_timeout=60.0)
    state.add_model("m", expected=1, version="3", max_queue=max_queue)
    return state


def register(state: PoolState, identity: bytes = W1, rows: int = 4, prefetch: int = 0, **info) -> None:
    info = {"version": "3", "max_batch_size": rows, "prefetch": prefetch, "pid": 7, **info}
    state.worker_message(identity, protocol.encode_ready("m", info))
    state.dispatch()


def answer(state: PoolState, identity: bytes, rids: list[tuple[bytes, bytes]], stats: dict | None = None,
           status: bytes = protocol.OK) -> None:
    """The worker answers these (client, rid) in one REPLIES, with its stats frame."""
    body = [protocol.packb({"model_name": "m", "model_version": "3", "outputs": []})]
    items = [protocol.ReplyItem(client, rid, status, body) for client, rid in rids]
    state.worker_message(identity, protocol.encode_replies(items, stats))
    state.dispatch()


# --- histograms ------------------------------------------------------------------------------------


def test_a_value_on_a_bound_falls_in_that_bucket_and_past_the_last_in_inf():
    h = Histogram([1.0, 2.0, 5.0])
    for value in (0.0, 1.0, 1.5, 2.0, 5.0, 5.01, 100.0):
        h.observe(value)
    assert h.counts == [2, 2, 1, 2] and h.count == 7 and h.sum == pytest.approx(114.51)
    snap = h.snapshot()
    assert snap.cumulative() == [(1.0, 2), (2.0, 4), (5.0, 5), (math.inf, 7)]
    h.observe(1.0)
    assert snap.counts == (2, 2, 1, 2)  # a snapshot is a copy


@pytest.mark.parametrize("bounds", [[], [1.0, 1.0], [2.0, 1.0], [1.0, math.inf], [math.nan]])
def test_histogram_bounds_must_be_finite_and_increasing(bounds):
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram(bounds)


def test_quantile_interpolates_within_the_bucket_as_prometheus_does():
    h = Histogram([0.01, 0.02, 0.04])
    assert h.snapshot().quantile(0.5) is None
    for value in [0.005] * 2 + [0.015] * 6 + [0.03] * 2:
        h.observe(value)
    snap = h.snapshot()
    assert snap.quantile(0.5) == pytest.approx(0.01 + 0.01 * 3 / 6)  # rank 5: 3rd of 6 in (0.01, 0.02]
    assert snap.quantile(0.1) == pytest.approx(0.005)  # rank 1 of 2 in (0, 0.01]
    assert snap.quantile(1.0) == pytest.approx(0.04)
    h.observe(99.0)
    assert h.snapshot().quantile(0.99) == 0.04  # in +Inf: the largest bound


def test_minus_and_the_wire_form_round_trip():
    h = Histogram(DURATION_BUCKETS)
    h.observe(0.003)
    before = h.snapshot()
    h.observe(0.2)
    h.observe(0.2)
    delta = h.snapshot().minus(before)
    assert delta.count == 2 and delta.sum == pytest.approx(0.4) and delta.quantile(0.5) == pytest.approx(0.175)
    assert before.minus(h.snapshot()) == before  # counts went down: a restart, not a delta
    assert HistogramSnapshot.from_wire(h.snapshot().to_wire()) == h.snapshot()
    for bad in ({"le": [1.0], "counts": [1], "sum": 1.0}, {"le": [1.0], "counts": [1, -1], "sum": 0},
                {"le": ["a"], "counts": [1, 1], "sum": 0}, {"le": [1.0], "counts": [1, 1]}, [1, 2]):
        with pytest.raises(ValueError):
            HistogramSnapshot.from_wire(bad)


def test_batch_buckets_reach_the_largest_batch_a_worker_may_announce():
    assert BATCH_BUCKETS[0] == 1 and BATCH_BUCKETS[-1] == 65536


@pytest.mark.parametrize("status, reason", [
    (b"400", "invalid_input"), (b"413", "invalid_input"), (b"429", "queue_full"), (b"500", "model_error"),
    (b"501", "model_error"), (b"201", "model_error"), (b"503", "unavailable"), (b"504", "timeout"),
])
def test_failure_reasons_by_status(status, reason):
    assert REASONS[reason_of_status(status)] == reason


def test_failure_reasons_of_the_brokers_own_errors():
    assert REASONS[reason_of_error(errors.WorkerCrashed("twice"))] == "worker_crashed"
    assert REASONS[reason_of_error(errors.Overloaded("full"))] == "queue_full"
    assert REASONS[reason_of_error(errors.ProtocolError("bad"))] == "invalid_input"
    assert REASONS[reason_of_error(errors.Unavailable("down"))] == "unavailable"
    m = ModelMetrics()
    for reason in range(len(REASONS)):
        m.failed(reason)
    assert (m.failed_total, m.client_errors, m.errors) == (6, 2, 4)  # 4xx: invalid_input and queue_full


# --- what the broker counts (fake clock) -----------------------------------------------------------


def test_n_requests_count_n_successes_with_queue_and_request_time_from_the_clock(clock):
    state = pool(clock)
    register(state, rows=4)
    for i in range(5):  # one burst: 4 rows go as one batch, the fifth waits for the worker
        infer(state, ALICE, "m", b"%d" % i, dispatch=False)
    clock.advance(0.003)
    state.dispatch()
    first = [rid for _, _, rid in dispatched(state)]
    assert first == [b"0", b"1", b"2", b"3"]
    clock.advance(0.010)
    answer(state, W1, [(ALICE, rid) for rid in first], {"calls": [[4, 9000]]})
    assert dispatched(state) == [(W1, ALICE, b"4")]  # 13 ms in the queue
    clock.advance(0.002)
    answer(state, W1, [(ALICE, b"4")], {"calls": [[1, 1500]]})
    assert len(client_out(state)) == 5
    m = state.models[b"m"].metrics
    assert m.success == 5 and m.failed_total == 0
    queue = m.queue.snapshot()
    assert queue.count == 5 and queue.sum == pytest.approx(4 * 0.003 + 0.013)
    assert queue.cumulative()[DURATION_BUCKETS.index(0.005)][1] == 4  # the four waited 3 ms
    requests = m.request_ok.snapshot()
    assert requests.count == 5 and requests.sum == pytest.approx(4 * 0.013 + 0.015)
    assert m.compute.count == 2 and m.compute.sum == pytest.approx(0.0105)
    assert m.batch.counts[BATCH_BUCKETS.index(4)] == 1 and m.batch.sum == 5
    summary = state.models[b"m"].summary()
    assert (summary["served"], summary["success"], summary["failed"], summary["dispatched"]) == (5, 5, 0, 5)
    assert summary["queue_seconds"] == pytest.approx(0.025)
    assert summary["request_seconds"] == pytest.approx(0.067)
    assert (summary["executions"], summary["inferences"], summary["compute_seconds"]) == (2, 5, 0.0105)
    assert summary["batches"] == 2 and summary["batch_rows"] == 5  # what the broker sent: the same here


def test_a_429_and_a_504_land_under_their_reasons(clock):
    state = pool(clock, max_queue=1)
    register(state, rows=1)
    infer(state, ALICE, "m", b"busy")  # the worker takes it
    infer(state, ALICE, "m", b"late", timeout_ms=5)  # waits: the queue is now full
    infer(state, BOB, "m", b"refused")
    only_error(state, BOB, b"refused", b"429", errors.Overloaded)
    clock.advance(0.010)
    state.tick()
    only_error(state, ALICE, b"late", b"504", errors.RequestTimeout)
    m = state.models[b"m"].metrics
    failures = dict(zip(REASONS, m.failures))
    assert failures == {"invalid_input": 0, "queue_full": 1, "model_error": 0, "worker_crashed": 0,
                        "unavailable": 0, "timeout": 1}
    # the refusal never waited; the 504 waited 10 ms from its admission
    assert m.request_failed.count == 1 and m.request_failed.sum == pytest.approx(0.010)
    entry = state.models[b"m"]
    assert (entry.client_errors, entry.errors, entry.expired) == (1, 1, 1)
    assert entry.summary()["failures"] == failures


def test_worker_errors_bad_input_and_crashes_count_by_reason(clock):
    state = pool(clock)
    register(state, W1, rows=1)
    register(state, W2, rows=1)
    infer(state, ALICE, "m", b"a")
    infer(state, ALICE, "m", b"b")
    sent = dict((rid, w) for w, _, rid in dispatched(state))
    answer(state, sent[b"a"], [(ALICE, b"a")], status=b"500")  # the model raised
    answer(state, sent[b"b"], [(ALICE, b"b")], status=b"504")  # expired in the worker
    infer(state, ALICE, "m", b"bad", timeout_ms=-1)  # 400 at admission
    infer(state, ALICE, "m", b"poison")
    first = dispatched(state)[0][0]
    state.worker_lost(first, "killed")
    second = dispatched(state)[0][0]
    state.worker_lost(second, "killed")  # crashed two workers: 500 WorkerCrashed
    failures = dict(zip(REASONS, state.models[b"m"].metrics.failures))
    assert failures == {"invalid_input": 1, "queue_full": 0, "model_error": 1, "worker_crashed": 1,
                        "unavailable": 0, "timeout": 1}
    assert state.models[b"m"].metrics.request_failed.count == 3  # the 400 was never admitted


def test_worker_stats_give_compute_batch_memory_and_load_time(clock):
    state = pool(clock)
    register(state, W1, load_seconds=2.5, rss_bytes=100 << 20)
    entry = state.models[b"m"]
    assert entry.load_seconds == 2.5 and entry.memory_bytes == 100 << 20
    state.worker_message(W1, protocol.encode_heartbeat({"rss_bytes": 150 << 20}))
    register(state, W2, load_seconds=1.25)
    assert entry.memory_bytes == 150 << 20 and entry.load_seconds == 1.25  # W2 has not said yet: W1's only
    state.worker_message(W2, protocol.encode_heartbeat({"rss_bytes": 50 << 20}))
    assert entry.memory_bytes == 200 << 20
    infer(state, ALICE, "m", b"1")
    infer(state, ALICE, "m", b"2")
    sent = {w: rid for w, _, rid in dispatched(state)}
    answer(state, W2, [(ALICE, sent[W2])], {"calls": [[2, 1000], [32, 250_000]]})
    assert entry.metrics.compute.count == 2 and entry.metrics.batch.sum == 34
    assert entry.metrics.compute.sum == pytest.approx(0.251)
    state.worker_lost(W1, "gone")
    assert entry.memory_bytes == 50 << 20
    workers = entry.summary()["workers"]
    assert [(w["load_seconds"], w["rss_bytes"]) for w in workers] == [(1.25, 50 << 20)]


@pytest.mark.parametrize("info", [{"load_seconds": -1, "rss_bytes": -5}, {"load_seconds": math.nan},
                                  {"load_seconds": True, "rss_bytes": "1G"}, {"rss_bytes": 1.5}])
def test_invalid_ready_figures_are_ignored_and_the_worker_registers(clock, info):
    state = pool(clock)
    register(state, W1, **info)
    entry = state.models[b"m"]
    assert entry.ready == 1 and entry.load_seconds is None and entry.memory_bytes is None


def test_stats_from_an_unknown_worker_count_nothing(clock):
    state = pool(clock)
    state.worker_message(W1, protocol.encode_heartbeat({"rss_bytes": 1}))
    reply_frames = protocol.encode_replies([protocol.ReplyItem(ALICE, b"r", b"200", [protocol.packb({})])],
                                           {"calls": [[1, 10]]})
    state.worker_message(W1, reply_frames)
    assert state.models[b"m"].memory_bytes is None and state.models[b"m"].metrics.compute.count == 0


def test_restarts_are_counted_per_model(clock):
    state = pool(clock)
    state.count_restart("m")
    state.count_restart("m")
    state.count_restart("other")  # not served: ignored
    assert state.models[b"m"].summary()["worker_restarts"] == 2


def test_mmi_metrics_answers_the_histogram_buckets(clock):
    state = pool(clock)
    register(state)
    infer(state, ALICE, "m", b"1")
    clock.advance(0.5)
    answer(state, W1, [(ALICE, b"1")], {"calls": [[1, 400_000]]})
    client_out(state)
    state.client_message(BOB, protocol.encode_request("mmi.metrics", b"q", {}))
    (who, rep), = client_out(state)
    assert who == BOB and rep.status == b"200" and rep.model == b"mmi.metrics"
    assert rep.header["uptime_seconds"] == pytest.approx(0.5)
    (model,) = rep.header["models"]
    assert (model["name"], model["version"]) == ("m", "3")
    hists = {k: HistogramSnapshot.from_wire(v) for k, v in model["histograms"].items()}
    assert set(hists) == {"request_seconds", "failed_request_seconds", "queue_seconds", "compute_seconds",
                          "batch_rows"}
    assert hists["request_seconds"].count == 1 and hists["request_seconds"].sum == pytest.approx(0.5)
    assert hists["compute_seconds"].quantile(0.5) == pytest.approx(0.25 + 0.25 * 0.5)  # in (0.25, 0.5]
    assert hists["failed_request_seconds"].count == 0


# --- the Prometheus text ---------------------------------------------------------------------------


def scrape_text(state: PoolState) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(state.metrics_snapshot))
    return generate_latest(registry).decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, **labels) -> dict:
    """sample name -> value, for the samples whose labels include these."""
    return {s.name + ("" if "le" not in s.labels else f"{{le={s.labels['le']}}}"): s.value for s in family.samples
            if all(s.labels.get(k) == v for k, v in labels.items())}


def test_the_collectors_text_parses_back_with_names_labels_and_buckets(clock):
    state = pool(clock, max_queue=2)
    state.add_model("idle", expected=2, version="1")
    register(state, rows=2, load_seconds=3.0, rss_bytes=1 << 30)
    state.set_starting("idle", 1)
    infer(state, ALICE, "m", b"1", dispatch=False)
    infer(state, ALICE, "m", b"2", dispatch=False)
    clock.advance(0.002)
    state.dispatch()
    infer(state, ALICE, "m", b"3")  # waits
    infer(state, ALICE, "m", b"4")  # waits
    infer(state, BOB, "m", b"5")  # 429
    clock.advance(0.020)
    answer(state, W1, [(ALICE, b"1"), (ALICE, b"2")], {"calls": [[2, 15_000]]})  # 3 and 4 go next
    infer(state, ALICE, "m", b"6")  # waits
    state.count_restart("m")
    fams = families(scrape_text(state))
    assert all(name.startswith("modelpool_") for name in fams)
    labels = {"model": "m", "version": "3"}
    assert fams["modelpool_request_success"].type == "counter"
    assert samples(fams["modelpool_request_success"], **labels) == {"modelpool_request_success_total": 2}
    assert samples(fams["modelpool_request_failure"], reason="queue_full", **labels) == {
        "modelpool_request_failure_total": 1}
    assert {s.labels["reason"] for s in fams["modelpool_request_failure"].samples} == set(REASONS)
    assert samples(fams["modelpool_inferences"], **labels) == {"modelpool_inferences_total": 2}
    assert samples(fams["modelpool_executions"], **labels) == {"modelpool_executions_total": 1}
    assert samples(fams["modelpool_pending_requests"], **labels) == {"modelpool_pending_requests": 1}
    assert samples(fams["modelpool_inflight_requests"], **labels) == {"modelpool_inflight_requests": 2}
    assert samples(fams["modelpool_queue_bytes"], **labels)["modelpool_queue_bytes"] > 0
    assert samples(fams["modelpool_replicas"], state="ready", **labels) == {"modelpool_replicas": 1}
    assert samples(fams["modelpool_replicas"], model="idle", state="starting") == {"modelpool_replicas": 1}
    assert samples(fams["modelpool_replicas_expected"], model="idle") == {"modelpool_replicas_expected": 2}
    assert samples(fams["modelpool_worker_restarts"], **labels) == {"modelpool_worker_restarts_total": 1}
    assert samples(fams["modelpool_model_load_duration_seconds"]) == {"modelpool_model_load_duration_seconds": 3}
    assert samples(fams["modelpool_worker_memory_bytes"]) == {"modelpool_worker_memory_bytes": 1 << 30}
    queue = fams["modelpool_queue_duration_seconds"]
    assert queue.type == "histogram"
    got = samples(queue, **labels)
    assert got["modelpool_queue_duration_seconds_count"] == 4  # 1 and 2 waited 2 ms, 3 and 4 20 ms
    assert got["modelpool_queue_duration_seconds_sum"] == pytest.approx(0.044)
    assert got["modelpool_queue_duration_seconds_bucket{le=0.001}"] == 0
    assert got["modelpool_queue_duration_seconds_bucket{le=0.0025}"] == 2
    assert got["modelpool_queue_duration_seconds_bucket{le=0.025}"] == 4
    assert got["modelpool_queue_duration_seconds_bucket{le=+Inf}"] == 4
    assert len([k for k in got if "_bucket" in k]) == len(DURATION_BUCKETS) + 1
    requests = samples(fams["modelpool_request_duration_seconds"], outcome="success", **labels)
    assert requests["modelpool_request_duration_seconds_count"] == 2
    assert requests["modelpool_request_duration_seconds_sum"] == pytest.approx(0.044)
    compute = samples(fams["modelpool_compute_duration_seconds"], **labels)
    assert compute["modelpool_compute_duration_seconds_count"] == 1
    assert compute["modelpool_compute_duration_seconds_bucket{le=0.01}"] == 0
    assert compute["modelpool_compute_duration_seconds_bucket{le=0.025}"] == 1
    batch = samples(fams["modelpool_batch_size"], **labels)
    assert batch["modelpool_batch_size_bucket{le=1.0}"] == 0 and batch["modelpool_batch_size_bucket{le=2.0}"] == 1
    # unknown figures have no sample rather than a misleading 0
    assert samples(fams["modelpool_worker_memory_bytes"], model="idle") == {}


# --- the endpoint ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_endpoint_serves_the_text_and_the_brokers_process_figures(clock):
    state = pool(clock)
    register(state)
    server = MetricsServer("127.0.0.1", 0, state.metrics_snapshot)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        fams = families(text)
        assert samples(fams["modelpool_replicas"], state="ready") == {"modelpool_replicas": 1}
        assert "process_cpu_seconds" in fams  # the broker's own CPU, deliberately
        assert not any(name.startswith("python_gc") for name in fams)
    finally:
        server.close()
    with pytest.raises(OSError):  # closed: nothing listens
        urllib.request.urlopen(server.url, timeout=2)


def test_a_taken_port_is_a_clear_error_naming_the_port_and_the_flag(clock):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1 port {port}: .*--metrics-port"):
            MetricsServer("127.0.0.1", port, pool(clock).metrics_snapshot)


def test_serve_stops_at_start_when_the_metrics_port_is_taken(tmp_path, capsys):
    from modelpool import cli

    (tmp_path / "m.keras").write_bytes(b"")
    config = tmp_path / "pool.toml"
    config.write_text(f'[pool]\nfrontend = "ipc://{tmp_path}/front.ipc"\n\n'
                      f'[[models]]\nname = "m"\npath = "{tmp_path}/m.keras"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "-c", str(config), "--metrics-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"modelpool: cannot start: cannot serve metrics on 127.0.0.1 port {port}")
    assert "--metrics-port" in err and err.count("\n") == 1


# --- config ----------------------------------------------------------------------------------------


def model_table(tmp_path) -> dict:
    (tmp_path / "m.keras").write_bytes(b"")
    return {"name": "m", "path": str(tmp_path / "m.keras")}


def test_metrics_table_defaults_and_values(tmp_path):
    cfg = pool_config.from_dict({"models": [model_table(tmp_path)]})
    assert cfg.metrics == MetricsConfig(enabled=True, host="127.0.0.1", port=8002)
    cfg = pool_config.from_dict({"models": [model_table(tmp_path)], "metrics": {"port": 9100, "host": "::1"}})
    assert (cfg.metrics.host, cfg.metrics.port, cfg.metrics.local) == ("::1", 9100, True)
    cfg = pool_config.from_dict({"models": [model_table(tmp_path)], "metrics": {"enabled": False}})
    assert not cfg.metrics.enabled


@pytest.mark.parametrize("table, needle", [
    ({"port": -1}, r"\[metrics\]\.port must be an integer from 0 to 65535 \(0: any free port\), got -1"),
    ({"port": 70000}, r"\[metrics\]\.port must be an integer from 0 to 65535"),
    ({"port": "8002"}, r"\[metrics\]\.port must be an integer"),
    ({"enabled": "yes"}, r"\[metrics\]\.enabled must be true or false"),
    ({"host": ""}, r"\[metrics\]\.host must be an IP address or host name"),
    ({"host": "[::1]"}, r"\[metrics\]\.host must be an IP address or host name"),
    ({"path": "/m"}, r"\[metrics\]: unknown key\(s\) path; allowed: enabled, host, port"),
    ({"host": "0.0.0.0"}, r"\[metrics\]\.host '0.0.0.0' is not a loopback address.*insecure_network = true"),
])
def test_metrics_config_errors_name_the_key(tmp_path, table, needle):
    with pytest.raises(ConfigError, match=needle):
        pool_config.from_dict({"models": [model_table(tmp_path)], "metrics": table})


def test_metrics_must_be_a_table_and_a_public_host_needs_the_opt_in(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics must be a table: \[metrics\]"):
        pool_config.from_dict({"models": [model_table(tmp_path)], "metrics": 8002})
    cfg = pool_config.from_dict({"models": [model_table(tmp_path)], "metrics": {"host": "0.0.0.0"},
                                 "pool": {"insecure_network": True}})
    assert cfg.metrics.host == "0.0.0.0"
    off = pool_config.from_dict({"models": [model_table(tmp_path)], "metrics": {"host": "0.0.0.0", "enabled": False}})
    assert not off.metrics.enabled  # nothing is bound: no opt-in needed


def test_metrics_port_flag(tmp_path):
    from modelpool import cli

    cfg = PoolConfig(models=(ModelConfig(**model_table(tmp_path)),))
    parse = cli.build_parser().parse_args

    def flagged(config: PoolConfig, *flag: str) -> PoolConfig:
        args = parse(["serve", "--demo", *flag])
        return cli.apply_door_flags(config, {"metrics": args.metrics_port, "http": args.http_port,
                                             "grpc": args.grpc_port})

    assert flagged(cfg) is cfg
    assert flagged(cfg, "--metrics-port", "9100").metrics == MetricsConfig(port=9100)
    assert flagged(cfg, "--metrics-port", "0").metrics == MetricsConfig(port=0)  # any free port
    assert not flagged(cfg, "--metrics-port", "off").metrics.enabled
    assert not flagged(cfg, "--metrics-port", "OFF").metrics.enabled
    off = PoolConfig(models=cfg.models, metrics=MetricsConfig(enabled=False))
    assert flagged(off, "--metrics-port", "9100").metrics.enabled  # the flag turns them on again
    for bad in ("-1", "65536", "eighty"):
        with pytest.raises(SystemExit):
            parse(["serve", "--demo", "--metrics-port", bad])
