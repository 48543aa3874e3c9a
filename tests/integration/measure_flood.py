"""Measure the broker's RSS and log size under a flood (issue 10); not a test, a tool for the figures.

    .venv/bin/python tests/integration/measure_flood.py malformed   # 98k malformed requests, replies unread
    .venv/bin/python tests/integration/measure_flood.py big         # 2000 x 1 MB requests to a stalled model
    .venv/bin/python tests/integration/measure_flood.py big-expiring  # the same with timeout_ms 5000

Prints RSS before, at peak and 30 s after (the broker runs in a subprocess, fakepool.py), and log bytes.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

import zmq  # noqa: E402

from modelpool.client import protocol  # noqa: E402
from fakepool import FakePool  # noqa: E402


def stalled_worker(endpoint: str, stop: threading.Event) -> None:
    """Registers for "m", heartbeats, never answers: requests pile up in the broker's queue."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"stalled/0")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(protocol.encode_ready("m", {"version": "1", "max_batch_size": 1, "prefetch": 0,
                                                     "pid": os.getpid()}))
    while not stop.is_set():
        while sock.poll(0):
            sock.recv_multipart()
        sock.send_multipart(protocol.encode_heartbeat())
        stop.wait(0.3)
    sock.close(linger=0)


def main(kind: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="flood-"))
    pool = FakePool(directory, log_level="INFO")
    stop = threading.Event()
    worker = threading.Thread(target=stalled_worker, args=(pool.backend, stop), daemon=True)
    worker.start()
    time.sleep(1.0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # this client reads nothing
    sock.connect(pool.frontend)
    before = peak = pool.rss()
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, pool.rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    if kind == "malformed":
        bad = b"\xc1" * 16000  # not msgpack: logged and answered 400
        for i in range(98_000):
            sock.send_multipart([b"", protocol.CLIENT, b"m", b"r%d" % i, bad])
    else:
        header = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1 << 20]}]}
        if kind == "big-expiring":  # answered 504 after 5 s: the memory should go back
            header["timeout_ms"] = 5000
        header = protocol.packb(header)
        payload = os.urandom(1 << 20)
        for i in range(2000):
            sock.send_multipart([b"", protocol.CLIENT, b"m", b"r%d" % i, header, payload])
    sent = time.monotonic() - started
    time.sleep(5.0)
    at_peak = peak
    time.sleep(25.0)
    sampling.set()
    after = pool.rss()
    alive = pool.alive()
    log_bytes = len(pool.read_log())
    sock.close(linger=0)
    stop.set()
    code = pool.stop()
    print(f"{kind}: sent in {sent:.1f}s; alive={alive} exit={code}; RSS before {before >> 20} MiB, "
          f"peak {at_peak >> 20} MiB, 30 s after {after >> 20} MiB; log {log_bytes} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "malformed")
