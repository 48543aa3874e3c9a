"""The `modelpool` command line without a pool: parsing, help, the status table, predict output, exit codes."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from modelpool.broker.metrics import DURATION_BUCKETS
from modelpool.client import InvalidInput, ModelNotFound, RequestTimeout, Unavailable, protocol
from modelpool.client.base import DEFAULT_ENDPOINT
from modelpool import cli as modelpool

MODELS = [
    {"name": "digits", "version": "1", "replicas_ready": 2, "replicas_starting": 0, "replicas_failed": 0,
     "replicas_expected": 2, "queue_depth": 3, "in_flight": 4, "served": 12345, "errors": 1, "client_errors": 40,
     "batches": 1000, "batch_rows": 12345, "load_error": None,
     "workers": [{"id": "w1", "pid": 101, "state": "ready", "max_batch_size": 64, "in_flight": 2}]},
    {"name": "broken", "version": "2", "replicas_ready": 0, "replicas_starting": 1, "replicas_failed": 3,
     "replicas_expected": 1, "queue_depth": 0, "in_flight": 0, "served": 0, "errors": 7, "client_errors": 0,
     "load_error": "OSError: no such file\nwhile loading 'x.keras'", "workers": []},
]




def queue_histogram(*seconds: float) -> dict:
    """An mmi.metrics histogram map of these queue times."""
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    for value in seconds:
        counts[next((i for i, b in enumerate(DURATION_BUCKETS) if value <= b), len(DURATION_BUCKETS))] += 1
    return {"le": list(DURATION_BUCKETS), "counts": counts, "sum": sum(seconds)}


# digits: 100 requests waited 0.5 to 1 ms (p50 interpolates to 750 us); broken: none
METRICS = {"uptime_seconds": 100.0, "models": [
    {"name": "digits", "version": "1", "histograms": {"queue_seconds": queue_histogram(*[0.0008] * 100)}},
    {"name": "broken", "version": "2", "histograms": {"queue_seconds": queue_histogram()}},
]}


class FakeClient:
    """Stands in for client.Client: records calls, answers from class attributes."""

    calls: list = []
    models_answer: list | Exception = MODELS
    metrics_answer: dict | None = METRICS  # None: a pool without mmi.metrics (501)
    infer_answer: dict | Exception = {}

    def __init__(self, endpoint, *, timeout):
        self.calls.append(("init", endpoint, timeout))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.calls.append(("close",))

    def models(self):
        if isinstance(self.models_answer, Exception):
            raise self.models_answer
        return self.models_answer

    def call(self, service, header):
        self.calls.append(("call", service))
        if self.metrics_answer is None:
            return protocol.Reply(service.encode(), b"1", b"501", {"error": {"type": "NotSupported"}}, [])
        return protocol.Reply(service.encode(), b"1", b"200", self.metrics_answer, [])

    def infer(self, model, inputs, outputs=None):
        self.calls.append(("infer", model, inputs, outputs))
        if isinstance(self.infer_answer, Exception):
            raise self.infer_answer
        return self.infer_answer


@pytest.fixture()
def fake(monkeypatch):
    class Fake(FakeClient):
        calls = []

    monkeypatch.setattr(modelpool, "Client", Fake)
    return Fake


# --- parsing and help --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "status", "predict"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        modelpool.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: modelpool {command}")
    if command != "serve":
        assert "--endpoint" in out and "--timeout" in out and "exit codes:" in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        modelpool.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("serve", "status", "predict"))


@pytest.mark.parametrize("argv", [
    [],
    ["nope"],
    ["predict", "digits"],  # --input is required
    ["predict", "--input", "x.npy"],  # MODEL is required
    ["status", "--timeout", "0"],
    ["status", "--timeout", "soon"],
    ["status", "--bogus"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        modelpool.main(argv)
    assert info.value.code == 2
    assert "usage: modelpool" in capsys.readouterr().err


def test_status_and_predict_defaults():
    args = modelpool.build_parser().parse_args(["status"])
    assert (args.endpoint, args.timeout, args.json) == (DEFAULT_ENDPOINT, 5.0, False)
    args = modelpool.build_parser().parse_args(["predict", "digits", "-i", "x.npy"])
    assert (args.model, args.input, args.output, args.fetch, args.values) == ("digits", "x.npy", None, None, False)
    assert (args.endpoint, args.timeout) == (DEFAULT_ENDPOINT, 30.0)
    args = modelpool.build_parser().parse_args([
        "predict", "m", "--input", "in.npz", "--output", "out.npz", "--fetch", "a", "--fetch", "b",
        "--endpoint", "ipc:///tmp/p.ipc", "--timeout", "2.5", "--values"])
    assert (args.fetch, args.endpoint, args.timeout, args.values) == (["a", "b"], "ipc:///tmp/p.ipc", 2.5, True)


# --- status ----------------------------------------------------------------------------------------


def test_status_table_lines_up_and_reports_load_errors():
    text = modelpool.format_status(modelpool.Sample(MODELS, METRICS, 0.0), "tcp://127.0.0.1:5555")
    lines = text.splitlines()
    assert lines[0] == "pool at tcp://127.0.0.1:5555; rates since the broker started 100s ago"
    header, broken, digits = lines[1], lines[2], lines[3]
    assert header.split() == ["MODEL", "VERSION", "READY", "STARTING", "FAILED", "QUEUE", "IN", "FLIGHT", "BATCH",
                              "REQ/S", "QUEUE", "P50", "SERVED", "4XX", "5XX"]
    assert broken.split() == ["broken", "2", "0/1", "1", "3", "0", "0", "-", "0.1", "-", "0", "0", "7"]  # by name
    # mean rows per batch; (12345 + 40 + 1) answered in 100 s; p50 of 100 waits in (0.5, 1] ms
    assert digits.split() == ["digits", "1", "2/2", "0", "0", "3", "4", "12.3", "124", "750us", "12345", "40", "1"]
    # numbers are right-aligned under their headings
    assert header.index("SERVED") + len("SERVED") == digits.index("12345") + len("12345")
    assert len(header) == len(digits) == len(broken)
    assert lines[4] == "model 'broken' version '2' failed to load: OSError: no such file while loading 'x.keras'"
    assert len(lines) == 5


def test_status_table_copes_with_missing_fields_and_no_models():
    assert modelpool.format_status([]) == "no models served"
    row = modelpool.format_status([{"name": "remote"}]).splitlines()[1]
    assert row.split() == ["remote"] + ["-"] * 12
    garbled = {"models": [{"name": "remote", "histograms": {"queue_seconds": {"le": [1.0], "counts": [1]}}}]}
    row = modelpool.format_status(modelpool.Sample([{"name": "remote"}], garbled, 0.0)).splitlines()[1]
    assert row.split() == ["remote"] + ["-"] * 12


def test_status_prints_the_table(fake, capsys):
    assert modelpool.main(["status", "--endpoint", "ipc:///tmp/x.ipc", "--timeout", "3"]) == 0
    out = capsys.readouterr().out
    assert out == modelpool.format_status(modelpool.Sample(MODELS, METRICS, 0.0), "ipc:///tmp/x.ipc") + "\n"
    assert fake.calls == [("init", "ipc:///tmp/x.ipc", 3.0), ("call", "mmi.metrics"), ("close",)]


def test_status_of_a_pool_without_mmi_metrics_shows_dashes(fake, capsys):
    fake.metrics_answer = None
    assert modelpool.main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pool at {DEFAULT_ENDPOINT}"
    assert lines[3].split()[7:10] == ["12.3", "-", "-"]  # BATCH from mmi.models; no REQ/S, no QUEUE P50


def test_status_json(fake, capsys):
    assert modelpool.main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {"endpoint": DEFAULT_ENDPOINT, "models": MODELS, "metrics": METRICS}


def _later(seconds: float, served: int, batches: int, rows: int, *queue: float) -> modelpool.Sample:
    """MODELS and METRICS after ``served`` more requests, ``batches`` more batches of ``rows`` rows in all,
    these queue times more, ``seconds`` later."""
    models = [dict(m) for m in MODELS]
    models[0].update(served=12345 + served, batches=1000 + batches, batch_rows=12345 + rows)
    metrics = {"uptime_seconds": 100.0 + seconds, "models": [
        {"name": "digits", "version": "1", "histograms": {"queue_seconds": queue_histogram(*[0.0008] * 100, *queue)}},
        METRICS["models"][1]]}
    return modelpool.Sample(models, metrics, seconds)


def test_watch_shows_rates_batch_and_p50_over_each_interval():
    samples = iter([modelpool.Sample(MODELS, METRICS, 0.0), _later(2.0, 50, 5, 40, *[0.02] * 50)])
    slept = []

    class Out(io.StringIO):
        def isatty(self):
            return True

    out = Out()
    assert modelpool.watch_status(lambda: next(samples), "ipc:///p", 2.0, out, sleep=slept.append, frames=2) == 0
    frames = out.getvalue().split(modelpool.CLEAR)
    assert frames[0] == "" and len(frames) == 3 and slept == [2.0]  # redrawn in place, slept between
    first, second = frames[1].splitlines(), frames[2].splitlines()
    assert first[0].endswith("rates since the broker started 100s ago")
    assert first[3].split()[7:10] == ["12.3", "124", "750us"]
    assert second[0] == "pool at ipc:///p; rates over the last 2.0s"
    # 50 answered in 2 s; 40 rows in 5 batches; the 50 new waits are all in (10, 25] ms
    assert second[3].split()[7:10] == ["8.0", "25.0", "17.5ms"]
    assert second[-1].startswith("refreshed ") and second[-1].endswith("every 2s; Ctrl-C stops")


def test_watch_keeps_going_through_errors_and_stops_on_ctrl_c():
    answers = iter([Unavailable("the connection to the broker was lost"), modelpool.Sample(MODELS, METRICS, 1.0)])

    def fetch():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sleep(seconds):
        if out.getvalue().count("refreshed") == 2:
            raise KeyboardInterrupt

    out = io.StringIO()  # not a terminal: frames one after another
    assert modelpool.watch_status(fetch, "ipc:///p", 1.0, out, sleep=sleep) == 0
    text = out.getvalue()
    assert modelpool.CLEAR not in text
    assert "modelpool: Unavailable: the connection to the broker was lost" in text
    assert text.count("digits") == 1 and text.count("refreshed") == 2


def test_status_watch_flag():
    assert modelpool.build_parser().parse_args(["status", "--watch"]).watch == 2.0
    assert modelpool.build_parser().parse_args(["status", "--watch", "0.5"]).watch == 0.5
    assert modelpool.build_parser().parse_args(["status"]).watch is None


def test_status_watch_and_json_together_is_a_usage_error(fake, capsys):
    assert modelpool.main(["status", "--watch", "--json"]) == 2
    assert "--watch draws the table" in capsys.readouterr().err
    assert fake.calls == []


@pytest.mark.parametrize("error", [
    RequestTimeout("no reply within 5.000s from tcp://127.0.0.1:5555"),
    ModelNotFound("model 'x' is not served here;\nmodels served: a"),
])
def test_status_errors_exit_1_with_one_line(fake, capsys, error):
    fake.models_answer = error
    assert modelpool.main(["status"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"modelpool: {type(error).__name__}: {' '.join(str(error).split())}\n"


# --- predict ---------------------------------------------------------------------------------------


def _softmax(rows: int) -> np.ndarray:
    logits = np.arange(rows * 10, dtype="float32").reshape(rows, 10) % 7
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype("float32")


def test_predict_prints_argmax_for_class_probabilities_and_saves(fake, tmp_path, capsys):
    x = np.ones((3, 64), "float32")
    np.save(tmp_path / "x.npy", x)
    probs = _softmax(3)
    fake.infer_answer = {"probs": probs}
    out_path = tmp_path / "probs.npy"
    code = modelpool.main(["predict", "digits", "--input", str(tmp_path / "x.npy"), "--output", str(out_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "output 'probs': shape [3, 10] dtype float32" in captured.out
    assert f"argmax per row: {np.array2string(probs.argmax(1))}" in captured.out
    assert f"saved to {out_path}" in captured.out
    np.testing.assert_array_equal(np.load(out_path), probs)
    _, model, inputs, outputs = fake.calls[1]
    assert model == "digits" and isinstance(inputs, np.ndarray) and outputs is None  # a bare array: infer() names it
    np.testing.assert_array_equal(inputs, x)


def test_predict_prints_values_and_passes_named_inputs_and_fetch(fake, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", in_a=np.zeros((1, 4), "float32"), in_b=np.ones((1, 3), "float32"))
    fake.infer_answer = {"out_sum": np.array([[1.5, -2.25]], "float32"), "out_cls": _softmax(1)}
    out_path = tmp_path / "out.npz"
    code = modelpool.main(["predict", "multi", "-i", str(tmp_path / "in.npz"), "-o", str(out_path),
                           "--fetch", "out_sum", "--fetch", "out_cls", "--values"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "output 'out_sum': shape [1, 2] dtype float32\n[[ 1.5  -2.25]]" in captured.out
    assert "argmax" not in captured.out  # --values: the numbers themselves
    _, _, inputs, outputs = fake.calls[1]
    assert sorted(inputs) == ["in_a", "in_b"] and outputs == ["out_sum", "out_cls"]
    with np.load(out_path) as saved:
        assert sorted(saved.files) == ["out_cls", "out_sum"]


def test_regression_output_is_printed_as_values():
    text = modelpool.format_outputs({"y": np.array([[0.5, 2.0], [-1.0, 0.25]], "float32")})
    assert text.splitlines()[0] == "output 'y': shape [2, 2] dtype float32"
    assert "argmax" not in text and "2." in text
    assert modelpool.looks_like_probabilities(_softmax(4))
    assert not modelpool.looks_like_probabilities(np.array([[0.2, 0.2]], "float32"))
    assert not modelpool.looks_like_probabilities(np.array([0.5, 0.5], "float32"))


def test_predict_pool_error_exits_1(fake, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((2, 5), "float32"))
    fake.infer_answer = InvalidInput('input "pixels": expected shape [batch, 64] (FP32), got [2, 5]')
    assert modelpool.main(["predict", "digits", "--input", str(tmp_path / "x.npy")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"modelpool: InvalidInput: {fake.infer_answer}\n"
    assert captured.out == ""


@pytest.mark.parametrize("content", ["missing", "garbage", "pickled", "empty_npz"])
def test_predict_unreadable_input_exits_2_before_connecting(fake, tmp_path, capsys, content):
    path = tmp_path / "in.npy"
    if content == "garbage":
        path.write_bytes(b"this is not numpy")
    elif content == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content == "empty_npz":
        path = tmp_path / "in.npz"
        np.savez(path)
    assert modelpool.main(["predict", "digits", "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modelpool: ") and str(path) in err and err.count("\n") == 1
    assert fake.calls == []  # never talked to the pool


def test_predict_unwritable_output_exits_2(fake, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((1, 64), "float32"))
    fake.infer_answer = {"probs": _softmax(1)}
    bad = tmp_path / "no" / "such" / "dir" / "out.npy"
    assert modelpool.main(["predict", "digits", "-i", str(tmp_path / "x.npy"), "-o", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"modelpool: cannot write output file '{bad}'")


@pytest.mark.parametrize("toml,needle", [
    ('[[models]]\nname = "m"\npath = "MODEL"\nreplicas = -1\n', "models['m'].replicas must be an integer >= 0"),
    ('[[models]]\nname = "m"\npath = "MODEL"\ncolour = "red"\n', "unknown key(s) colour"),
    ('[[models]]\nname = "m"\npath = "missing.keras"\n', "does not exist"),
    ('[[models]]\nname = "m"\npath = "MODEL"\n[[models]]\nname = "m"\npath = "MODEL"\n', "duplicate model name(s) m"),
])
def test_serve_config_errors_stop_before_anything_starts(tmp_path, capsys, monkeypatch, toml, needle):
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    cfg = tmp_path / "pool.toml"
    cfg.write_text(toml.replace("MODEL", str(model)))
    started = []
    monkeypatch.setattr("modelpool.broker.server.Broker.__init__", lambda *a, **k: started.append(1))
    assert modelpool.main(["serve", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modelpool: config error:") and needle in err
    assert not started


def test_serve_missing_config_file(tmp_path, capsys):
    assert modelpool.main(["serve", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
