"""A broker without TensorFlow: the real broker loop in a subprocess, and an echo worker speaking MDPW01.

For tests of what the broker does with hostile peers, where a real model adds only start-up time.
``python fakepool.py CONFIG`` runs ``broker.server.Broker`` with no supervisor on the config's
endpoints; ``EchoWorker`` registers for a model and answers every request with its own body.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from poolutil import REPO, write_config

HERE = Path(__file__).resolve().parent


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class FakePool:
    """The broker loop in a subprocess (no supervisor, no TensorFlow) on private ipc endpoints."""

    def __init__(self, directory: Path, models: list[str] = ("m",), **pool: Any) -> None:
        self.dir = directory
        model_file = directory / "fake.keras"
        model_file.write_bytes(b"")  # the config checks that the path exists; nothing loads it
        pool.setdefault("frontend", f"ipc://{directory}/front.ipc")
        pool.setdefault("backend", f"ipc://{directory}/back.ipc")
        pool.setdefault("heartbeat_interval", 0.5)
        pool.setdefault("heartbeat_liveness", 10)
        self.frontend, self.backend = pool["frontend"], pool["backend"]
        config = write_config(directory / "pool.toml", [{"name": m, "path": str(model_file)} for m in models], **pool)
        self.log_path = directory / "broker.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(config)], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (directory / "front.ipc").exists() and "front.ipc" in self.frontend:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake broker did not start:\n{self.read_log()}")
            time.sleep(0.05)

    def read_log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._log.close()
        return code


class EchoWorker(threading.Thread):
    """A worker thread that registers for ``model`` and answers each request of a BATCH with status 200
    and its body."""

    def __init__(self, endpoint: str, model: str = "m", identity: bytes = b"echo/0", capacity: int = 4,
                 heartbeat: float = 0.5) -> None:
        super().__init__(daemon=True)
        from modelpool.client import protocol

        self.protocol = protocol
        self.endpoint, self.model, self.identity = endpoint, model, identity
        self.capacity, self.heartbeat = capacity, heartbeat
        self.stopping = threading.Event()
        self.served = 0
        self.ctx = zmq.Context.instance()

    def run(self) -> None:
        p = self.protocol
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        info = {"version": "1", "max_batch_size": self.capacity, "prefetch": 1, "pid": os.getpid()}
        sock.send_multipart(p.encode_ready(self.model, info))
        last = time.monotonic()
        try:
            while not self.stopping.is_set():
                if sock.poll(100):
                    message = p.parse_worker_message(sock.recv_multipart())
                    if message.command is p.Command.BATCH:
                        sock.send_multipart(p.encode_replies(
                            [p.ReplyItem(item.client, item.rid, p.OK, item.body) for item in message.fields]))
                        self.served += len(message.fields)
                    elif message.command is p.Command.DISCONNECT:
                        sock.send_multipart(p.encode_ready(self.model, info))
                if time.monotonic() - last >= self.heartbeat:
                    sock.send_multipart(p.encode_heartbeat())
                    last = time.monotonic()
            sock.send_multipart(p.encode_disconnect())
        finally:
            sock.close(linger=100)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


def main(config_path: str) -> int:
    from modelpool.broker import config as pool_config
    from modelpool.broker.server import Broker

    cfg = pool_config.load(config_path)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    broker = Broker(cfg, supervise=False)
    broker.install_signal_handlers()
    try:
        return broker.run()
    finally:
        broker.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
