"""Process sampling from /proc: memory and CPU of the launcher and its workers, and leftover cleanup."""
from __future__ import annotations

import collections
import os
import platform
import signal
import sys
import threading
import time

from bench.measure import perf


def read_rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def read_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0.0


class ProcSampler:
    """Peak RSS of the launcher and the sum over its workers (sampled every 100 ms), and CPU use per point."""

    def __init__(self, launcher: int, workers: list[int]) -> None:
        self.launcher, self.workers = launcher, workers
        self.peak_launcher = self.peak_workers = 0.0
        self._cpu0: tuple[float, float, float, float] = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_launcher = max(self.peak_launcher, read_rss_mb(self.launcher))
            self.peak_workers = max(self.peak_workers, sum(read_rss_mb(p) for p in self.workers))

    def _cpu(self) -> tuple[float, float, float, float]:
        return (perf(), time.process_time(), read_cpu_s(self.launcher), sum(read_cpu_s(p) for p in self.workers))

    def reset(self) -> None:
        self.peak_launcher = read_rss_mb(self.launcher)
        self.peak_workers = sum(read_rss_mb(p) for p in self.workers)
        self._cpu0 = self._cpu()

    def cpu_text(self) -> str:
        """CPU used since reset, in % of one core: load generator (this process), broker, workers."""
        now = self._cpu()
        wall = max(now[0] - self._cpu0[0], 1e-9)
        gen, broker, workers = ((b - a) / wall * 100 for a, b in zip(self._cpu0[1:], now[1:]))
        return f"cpu% gen {gen:.0f} / broker {broker:.0f} / workers {workers:.0f}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _proc_start(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), to tell it from a later one with the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root``."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    out, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            start = _proc_start(pid)
            if start is not None:
                out[pid] = start
                todo.append(pid)
    return out


def _alive(pid: int, start: int) -> bool:
    if _proc_start(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_leftovers(snapshot: dict[int, int], grace: float) -> list[int]:
    """SIGKILL the processes of ``snapshot`` still alive after ``grace`` seconds; returns their pids."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in snapshot.items()):
        time.sleep(0.2)
    left = [p for p, s in snapshot.items() if _alive(p, s)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict:
    """CPU model, cores, memory, OS and load average, for the page's header."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": cpu_count(), "memory": mem, "os": platform.platform(),
            "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def install_signal_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP unwind through the finally blocks that stop pools and Ray."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
