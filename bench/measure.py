"""Measured points: a time window of request latencies, and the row it becomes."""
from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

SEQ = "seq"  # the `inflight` value of sequential rows
STALL_SECONDS = 30.0
perf = time.perf_counter


def log(msg: str) -> None:
    """Progress on stderr (the benchmark's only output besides the page)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One measured point: a system, driven one way (``via``), at one concurrency (or sequential)."""

    workload: str
    system: str
    via: str
    inflight: int | str
    rps: float
    p50_ms: float
    p99_ms: float
    count: int
    errors: dict = field(default_factory=dict)
    note: str = ""
    launcher_rss_mb: float | None = None
    workers_rss_mb: float | None = None

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


class Window:
    """Latencies of requests that complete inside [start, end] (after the warm-up)."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.begin = perf()
        self.start = self.begin + warmup
        self.end = self.start + seconds
        self.seconds = seconds
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self.note = ""

    def record(self, sent: float, done: float) -> None:
        if self.start <= done <= self.end:
            self.latencies.append(done - sent)

    def error(self, status: str, done: float) -> None:
        if self.start <= done <= self.end:
            self.errors[status] += 1

    def open(self) -> bool:
        return perf() < self.end

    def row(self, workload: str, system: str, via: str, inflight: int | str) -> Row:
        lat = np.asarray(self.latencies) * 1000.0
        nan = float("nan")
        p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (nan, nan)
        return Row(workload, system, via, inflight, len(lat) / self.seconds, p50, p99, len(lat),
                   dict(self.errors), self.note)


def sequential(call: Callable[[], Any], warmup: float, seconds: float) -> Window:
    """Call one at a time until the window closes."""
    win = Window(warmup, seconds)
    while win.open():
        t0 = perf()
        call()
        win.record(t0, perf())
    return win
