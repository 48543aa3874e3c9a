"""The C example client (examples/c), built with its Makefile and run against a live pool and a fake broker."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from poolutil import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLE = REPO / "examples" / "c"
INSTALL = REPO / "scripts" / "install_c_deps.sh"
RUN_TIMEOUT = 30.0

# docs/PROTOCOL.md 7.1: the request header for one [1, 64] FP32 "pixels" input and a 1000 ms deadline.
EXAMPLE_HEADER = bytes.fromhex(
    "82 a6 69 6e 70 75 74 73 91 83 a4 6e 61 6d 65 a6"
    "70 69 78 65 6c 73 a8 64 61 74 61 74 79 70 65 a4"
    "46 50 33 32 a5 73 68 61 70 65 92 01 40 aa 74 69"
    "6d 65 6f 75 74 5f 6d 73 cd 03 e8"
)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _has_pkg(names: tuple[str, ...], header: str) -> bool:
    if shutil.which("pkg-config"):
        for name in names:
            if _run(["pkg-config", "--exists", name], 30).returncode == 0:
                return True
    return Path("/usr/include", header).is_file()


def _toolchain_missing() -> list[str]:
    """What the C build needs and this machine lacks (empty when it can build)."""
    missing = [tool for tool in ("cc", "make") if shutil.which(tool) is None]
    if not _has_pkg(("libzmq",), "zmq.h"):
        missing.append("zmq.h (libzmq3-dev)")
    if not _has_pkg(("msgpack-c", "msgpack"), "msgpack.h"):
        missing.append("msgpack.h (libmsgpack-dev)")
    return missing


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    """examples/c built with its Makefile; skipped, with the reason, where no toolchain can be had."""
    missing = _toolchain_missing()
    if missing:
        try:
            said = " ".join(_run(["bash", str(INSTALL)], 900).stderr.split()) or "nothing"
        except (OSError, subprocess.TimeoutExpired) as exc:
            said = f"could not run: {exc}"
        missing = _toolchain_missing()
        if missing:
            pytest.skip(f"C toolchain unavailable: missing {', '.join(missing)} after {INSTALL.name} "
                        f"(it said: {said})")
    program = tmp_path_factory.mktemp("c-client") / "modelpool_predict"
    build = _run(["make", "-C", str(EXAMPLE), f"PROGRAM={program}"], 180)
    assert build.returncode == 0, f"make -C examples/c failed:\n{build.stdout}\n{build.stderr}"
    return program


def _predict(binary: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], input=stdin or "", capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _parse(stdout: str) -> dict[str, dict]:
    """The tensors the client printed: {name: {"datatype", "shape", "rows", "argmax"}}."""
    tensors: dict[str, dict] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("output "):
            match = re.fullmatch(r"output (.+) (\S+) \[([\d, ]*)\]", line)
            assert match, f"unparsable output line {line!r}"
            shape = [int(d) for d in match[3].split(",") if d.strip()]
            current = tensors[match[1]] = {"datatype": match[2], "shape": shape, "rows": [], "argmax": None}
        elif line.startswith("  "):
            current["rows"].append(line.split())
        elif line.startswith("argmax "):
            name, *idx = line.split()[1:]
            tensors[name]["argmax"] = [int(i) for i in idx]
    return tensors


def _values(tensor: dict, dtype: str = "float32") -> np.ndarray:
    flat = [float(v) for row in tensor["rows"] for v in row]
    return np.asarray(flat, dtype=dtype).reshape(tensor["shape"])


# --- against the live pool ---------------------------------------------------------------------


def test_prediction_matches_keras(binary, pool, models, rng):
    x = rng.normal(size=(3, 8)).astype("float32")
    text = "\n".join(" ".join(repr(float(v)) for v in row) for row in x)
    done = _predict(binary, pool.endpoint, "a", "x", "3", "8", stdin=text)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "model a version 1"
    out = _parse(done.stdout)
    assert list(out) == ["y"]
    assert out["y"]["datatype"] == "FP32" and out["y"]["shape"] == [3, 4]
    want = np.asarray(models.keras["a"](x, training=False))
    np.testing.assert_allclose(_values(out["y"]), want, rtol=1e-4, atol=1e-6)
    assert out["y"]["argmax"] == list(np.argmax(want, axis=1))


def test_values_as_arguments_and_the_only_input_named_empty(binary, pool, models):
    x = np.linspace(-2.0, 2.0, 8, dtype="float32").reshape(1, 8)
    done = _predict(binary, "-t", "5000", pool.endpoint, "b", "", "1", "8", "--", *(repr(float(v)) for v in x[0]))
    assert done.returncode == 0, done.stderr
    out = _parse(done.stdout)
    np.testing.assert_allclose(_values(out["y"]), np.asarray(models.keras["b"](x, training=False)), rtol=1e-4,
                               atol=1e-6)


def test_selected_intermediate_layer(binary, pool, models, rng):
    import keras

    x = rng.normal(size=(2, 8)).astype("float32")
    done = _predict(binary, "-o", "hidden", pool.endpoint, "a", "x", "2", "8",
                    stdin=" ".join(map(repr, x.ravel().tolist())))
    assert done.returncode == 0, done.stderr
    out = _parse(done.stdout)
    assert list(out) == ["hidden"] and out["hidden"]["shape"] == [2, 16]
    a = models.keras["a"]
    want = np.asarray(keras.Model(a.input, a.get_layer("hidden").output)(x, training=False))
    np.testing.assert_allclose(_values(out["hidden"]), want, rtol=1e-4, atol=1e-6)


def test_unknown_model_exits_1_with_404(binary, pool):
    done = _predict(binary, pool.endpoint, "nope", "x", "1", "8", stdin="0 " * 8)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error 404 ModelNotFound: ")
    assert "nope" in done.stderr and done.stdout == ""


def test_wrong_shape_exits_1_with_400_invalid_input(binary, pool):
    done = _predict(binary, pool.endpoint, "a", "x", "1", "5", stdin="0 " * 5)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error 400 InvalidInput: ")
    assert "[1, 5]" in done.stderr


# --- against a fake broker: exact frames, other datatypes, fallbacks, timeouts ------------------


class FakeBroker:
    """A ROUTER on a private ipc endpoint that hands the test each request the C client sends."""

    def __init__(self, tmp_path: Path) -> None:
        self.endpoint = f"ipc://{tmp_path}/fake.ipc"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)

    def receive(self) -> list[bytes]:
        assert self.sock.poll(int(RUN_TIMEOUT * 1000)), "the C client sent nothing"
        return self.sock.recv_multipart()

    def reply(self, request: list[bytes], status: bytes, header: dict, tensors: list[bytes] = (),
              rid: bytes | None = None) -> None:
        identity, _, _, model, own_rid = request[:5]
        self.sock.send_multipart([identity, b"", b"MDPC01", model, rid or own_rid, status,
                                  msgpack.packb(header), *tensors])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture()
def fake(tmp_path):
    broker = FakeBroker(tmp_path)
    yield broker
    broker.close()


def _start(binary: Path, *args: str, stdin: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdin = None  # written already; communicate() only collects the output
    return proc


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_request_frames_are_the_protocol_example(binary, fake):
    """The worked example of docs/PROTOCOL.md 7.1, byte for byte, and the 7.2 reply printed."""
    pixels = np.zeros(64, dtype="float32")
    pixels[2:6] = [5.0, 13.0, 9.0, 1.0]
    proc = _start(binary, "-t", "1000", fake.endpoint, "digits", "pixels", "1", "64",
                  stdin=" ".join(repr(float(v)) for v in pixels))
    try:
        request = fake.receive()
        assert request[1:4] == [b"", b"MDPC01", b"digits"]
        assert 1 <= len(request[4]) <= 255
        assert request[5] == EXAMPLE_HEADER
        assert request[6:] == [pixels.astype("<f4").tobytes()]
        probs = np.array([[0.97, 0.001, 0.004, 0.002, 0.003, 0.006, 0.004, 0.001, 0.006, 0.003]], "<f4")
        fake.reply(request, b"200", {"model_name": "digits", "model_version": "1",
                                     "outputs": [{"name": "probs", "datatype": "FP32", "shape": [1, 10]}]},
                   [probs.tobytes()])
    finally:
        code, out, err = _finish(proc)
    assert code == 0, err
    got = _parse(out)["probs"]
    np.testing.assert_array_equal(_values(got), probs)
    assert got["argmax"] == [0]


def test_other_datatypes_and_a_late_reply_for_another_request(binary, fake):
    outputs = {
        "i64": np.array([[-(2**40), 1, -(2**63)], [7, 8, 9]], "<i8"),
        "u16": np.array([[65535, 0]], "<u2"),
        "i8": np.array([-128, 127], "<i1"),
        "half": np.array([[0.5, -2.0, 65504.0]], "<f2"),
        "f64": np.array(0.1, "<f8"),
        "flag": np.array([True, False], "bool"),
        "none": np.zeros((0, 3), "<f4"),
    }
    metas = [{"name": n, "datatype": dt, "shape": list(a.shape)} for (n, a), dt in
             zip(outputs.items(), ["INT64", "UINT16", "INT8", "FP16", "FP64", "BOOL", "FP32"])]
    words = [b"ab", "é".encode(), b""]
    metas.append({"name": "words", "datatype": "BYTES", "shape": [3]})
    frames = [a.tobytes() for a in outputs.values()]
    frames.append(b"".join(len(w).to_bytes(4, "little") + w for w in words))
    proc = _start(binary, fake.endpoint, "m", "", "2", "--", "1", "2")
    try:
        request = fake.receive()
        fake.reply(request, b"500", {"error": {"type": "ModelError", "message": "stale"}}, rid=b"someone else")
        fake.reply(request, b"200", {"model_name": "m", "model_version": "3", "outputs": metas}, frames)
    finally:
        code, out, err = _finish(proc)
    assert code == 0, err
    got = _parse(out)
    for name, array in outputs.items():
        dtype = "float64" if array.dtype.kind == "f" else "int64"
        np.testing.assert_array_equal(_values(got[name], dtype), array.astype(dtype), err_msg=name)
    assert got["i64"]["argmax"] == [1, 2] and got["u16"]["argmax"] == [0]
    assert got["none"]["shape"] == [0, 3] and got["none"]["argmax"] == []
    assert got["words"]["rows"] == [['"ab"', '"\\xc3\\xa9"', '""']]


@pytest.mark.parametrize(("status", "error", "line"), [
    (b"503", {"error": {"message": "starting"}}, "error 503 Unavailable: starting"),
    (b"429", {"error": {"type": "NoSuchClass", "message": "full"}}, "error 429 Overloaded: full"),
    (b"500", {"error": {"type": "WorkerCrashed", "message": "died"}}, "error 500 WorkerCrashed: died"),
    (b"418", {"error": {"type": 7, "message": "odd"}}, "error 418 PoolError: odd"),
    (b"400", {}, "error 400 InvalidInput: status 400 with no error message"),
])
def test_error_type_falls_back_by_status(binary, fake, status, error, line):
    proc = _start(binary, fake.endpoint, "m", "", "1", "--", "0")
    try:
        fake.reply(fake.receive(), status, error)
    finally:
        code, out, err = _finish(proc)
    assert (code, out, err) == (1, "", line + "\n")


def test_no_reply_exits_2_after_deadline_and_grace(binary, fake):
    started = time.monotonic()
    proc = _start(binary, "-t", "100", fake.endpoint, "m", "x", "1", "--", "0")
    try:
        fake.receive()
    finally:
        code, out, err = _finish(proc)
    assert code == 2 and out == ""
    assert err.startswith(f"timeout: no reply from {fake.endpoint} within 2100 ms")
    assert time.monotonic() - started < RUN_TIMEOUT


def test_reply_frame_of_the_wrong_length_exits_3(binary, fake):
    proc = _start(binary, fake.endpoint, "m", "x", "1", "--", "0")
    try:
        fake.reply(fake.receive(), b"200", {"outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}]},
                   [b"\0" * 4])
    finally:
        code, out, err = _finish(proc)
    assert code == 3
    assert "output 'y': FP32 needs 8 bytes, frame has 4" in err


def test_wrong_number_of_values_is_a_usage_error(binary):
    done = _predict(binary, "ipc:///nonexistent/none.ipc", "a", "x", "2", "8", stdin="1 2 3")
    assert done.returncode == 64
    assert "the shape needs 16 values, got 3" in done.stderr
