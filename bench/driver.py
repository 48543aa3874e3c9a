"""The benchmark run: every workload, then the page and the plots, written relative to the repository."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import REPO
from bench.measure import Row, log
from bench.procs import install_signal_handlers, machine_info
from bench.report import markdown, plot, versions, with_kept_sections
from bench.systems import ray_available, run_workload


def run(args: argparse.Namespace, command: str) -> int:
    """Measure, then write ``args.out`` (relative paths are under the repository root) and its plots."""
    install_signal_handlers()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    info = machine_info()
    vers = versions("ray-serve-2" in args.systems and ray_available())
    log(f"{info['cpu']}, {info['cores']} cores, load {info['load']}; " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    notes: list[str] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mp-bench-") as tmp:
        for wl in args.workloads:
            rows += run_workload(wl, args, Path(tmp), notes)
    for r in rows:
        if r.errors or r.note.startswith("stalled"):
            notes.append(f"{r.system} via {r.via} on `{r.workload}` at {r.inflight} in flight: {r.note} "
                         f"errors {r.errors}")
    notes += args.extra_notes
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    plots: dict[str, str] = {}
    if not args.no_write:
        out.parent.mkdir(parents=True, exist_ok=True)
        for wl in args.workloads:
            png = out.parent / f"bench_{wl}.png"
            plot(rows, wl, png)
            plots[wl] = png.name
    text = markdown(rows, args, info, vers, command, notes, plots)
    print(text)
    if not args.no_write:
        text = with_kept_sections(text, out.read_text() if out.exists() else "")
        out.write_text(text)
        log(f"wrote {out} and {', '.join(plots.values())}")
    return 0
