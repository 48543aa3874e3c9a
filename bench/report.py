"""The markdown page (tables, targets, notes) and the throughput plots."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import numpy as np
import zmq

from bench.loadgen import GENERATOR_TEXT, GENERATORS
from bench.measure import SEQ, Row
from bench.systems import CEILING_BATCH, SYSTEM_TEXT
from bench.workloads import WORKLOAD_TEXT, WORKLOADS

USER_VIAS = tuple(GENERATORS[g][1] for g in ("submit", "async"))  # the public clients at N in flight
RAW_VIA = GENERATORS["dealer"][1]


def versions(with_ray: bool) -> dict:
    """Versions of what was measured."""
    import keras
    import msgpack
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
           "msgpack": ".".join(map(str, msgpack.version))}
    if with_ray:
        import ray

        out["ray"] = ray.__version__
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def find(rows: list[Row], workload: str, system: str, inflight: int | str, via: str | None = None) -> Row | None:
    """The row of a system at one point (of one ``via``, or the first one)."""
    return next((r for r in rows if r.workload == workload and r.system == system and r.inflight == inflight
                 and via in (None, r.via)), None)


def ratio_to_threadpool(row: Row, rows: list[Row]) -> str:
    base = find(rows, row.workload, "threadpool", row.inflight)
    if base is None or not base.rps:
        return "-"
    return f"{row.rps / base.rps:.2f}x"


def table(rows: list[Row]) -> str:
    lines = ["| system | via | in flight | req/s | p50 ms | p99 ms | vs threadpool | launcher RSS MB | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        notes = r.note
        if r.errors:
            notes = (notes + "; " if notes else "") + "errors " + ", ".join(f"{k}: {v}" for k, v in r.errors.items())
        lines.append(f"| {r.system} | {r.via} | {r.inflight} | {fmt(r.rps, 0)} | {fmt(r.p50_ms, 3)} | "
                     f"{fmt(r.p99_ms, 3)} | {ratio_to_threadpool(r, rows)} | {fmt(r.launcher_rss_mb, 1)} | {notes} |")
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def targets(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(target, system, measured, verdict) for the issue's ratios, measured through the public clients."""
    out = []
    pools = sorted({r.system for r in rows if r.system.startswith("modelpool-")})
    driven = [(s, v) for s in pools for v in USER_VIAS if find(rows, "tiny", s, 128, v) or find(rows, "cnn", s, 32, v)]
    for base in ("threadpool", "threadpool tf.function"):
        tp = find(rows, "tiny", base, 128)
        for system, via in driven:
            mp = find(rows, "tiny", system, 128, via)
            ok = None if not (tp and mp and tp.rps) else mp.rps >= 8 * tp.rps
            got = f"{mp.rps / tp.rps:.2f}x ({fmt(mp.rps, 0)} vs {fmt(tp.rps, 0)} req/s)" if ok is not None else "-"
            out.append((f"tiny, 128 in flight: throughput >= 8x {base}", f"{system} via {via}", got, _verdict(ok)))
    ceiling = find(rows, "cnn", "in-process batch-N", CEILING_BATCH)
    batch32 = find(rows, "cnn", "in-process batch-N", 32)
    tp = find(rows, "cnn", "threadpool", 32)
    for system, via in driven:
        mp = find(rows, "cnn", system, 32, via)
        ok = None if not (batch32 and mp and batch32.rps) else mp.rps >= 0.9 * batch32.rps
        got = "-"
        if ok is not None:
            got = f"{mp.rps / batch32.rps:.0%} of batch-32's {fmt(batch32.rps, 0)} samples/s"
            if ceiling and ceiling.rps:
                got += f"; {mp.rps / ceiling.rps:.0%} of batch-{CEILING_BATCH}'s"
            if tp and tp.rps:
                got += f"; {mp.rps / tp.rps:.2f}x threadpool"
        out.append(("cnn, 32 in flight: throughput >= 90% of in-process batch-32 rate",
                    f"{system} via {via}", got, _verdict(ok)))
    direct = find(rows, "tiny", "direct tf.function", SEQ)
    for system in pools:
        mp = find(rows, "tiny", system, SEQ)
        ok = None if not (direct and mp) else mp.p50_ms <= 1.3 * direct.p50_ms
        got = f"{mp.p50_ms / direct.p50_ms:.2f}x ({fmt(mp.p50_ms, 3)} vs {fmt(direct.p50_ms, 3)} ms)" if ok is not None else "-"
        out.append(("tiny, sequential: p50 <= 1.3x in-process tf.function p50", f"{system} via Client.predict", got,
                    _verdict(ok)))
    for system in pools:
        peaks = [r.launcher_rss_mb for r in rows if r.system == system and r.launcher_rss_mb]
        ok = None if not peaks else max(peaks) < 100
        out.append(("launcher RSS < 100 MB under load", system, f"{max(peaks):.1f} MB peak" if peaks else "-",
                    _verdict(ok)))
    return out


def client_cost(rows: list[Row]) -> list[str]:
    """Lines comparing each public client with the raw DEALER generator at the same point."""
    out = []
    for r in rows:
        if r.via in USER_VIAS and r.inflight != SEQ:
            raw = find(rows, r.workload, r.system, r.inflight, RAW_VIA)
            if raw and raw.rps:
                out.append((r.workload, r.system, r.inflight, r.via, r.rps / raw.rps))
    if not out:
        return []
    lines = ["| workload | system | in flight | via | req/s as a share of raw DEALER |", "|---|---|---:|---|---:|"]
    lines += [f"| {w} | {s} | {n} | {v} | {share:.0%} |" for w, s, n, v, share in out]
    return lines


def markdown(rows: list[Row], args: argparse.Namespace, info: dict, vers: dict, command: str, notes: list[str],
             plots: dict[str, str]) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out = ["# Benchmarks", "",
           "Generated by `scripts/bench.py` (the code is in `bench/`); rerun it to refresh this page (numbers depend "
           "on the machine and on whatever else runs on it).", ""]
    if args.quick:
        out += ["> **Quick smoke-test run (`--quick`)**: points of "
                f"{args.seconds:g} s; these numbers only show that the benchmark works. Do not quote them.", ""]
    generators = "; ".join(f"`{GENERATORS[g][1]}`: {GENERATOR_TEXT[g]}" for g in args.generators)
    out += [
        f"- Date: {now}",
        f"- Command: `{command}`",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, {info['os']}; "
        f"load average (1/5/15 min) at start {info['load']}, at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- Each point: {args.warmup:g} s warm-up, then {args.seconds:g} s measured; latency is from send to "
        "reply; one sample per request.",
        f"- modelpool: launched with `python -m modelpool serve -c pool.toml` (`bench/pool.py`, the launcher the "
        f"integration tests use), ipc:// frontend, the pool's default heartbeats, max_batch_size "
        f"{' / '.join(f'{k} {v}' for k, v in args.max_batch.items() if k in args.workloads)}, "
        f"max_delay_ms {args.max_delay_ms:g}, pad_to_bucket {str(args.pad_to_bucket).lower()}.",
        "- modelpool requests go through the public clients, as a user calls them: sequential rows a blocking "
        f"`Client.predict`; rows at N in flight, one row per load generator (the `via` column): {generators}.",
        f"- threadpool: one process, model loaded once, `ThreadPoolExecutor({args.threadpool_workers})`, each "
        "request one `predict_on_batch` call (`threadpool tf.function`: one call of the compiled concrete "
        "function); TensorFlow's default thread settings.",
        "- direct: `direct tf.function` is the model wrapped in `tf.function` and `direct concrete function` its "
        "concrete function, called in-process one request at a time (the floor); `in-process batch-N` is one "
        "call on N rows, reported as samples/s (the compute ceiling).",
        "- `launcher RSS MB`: peak VmRSS of the `modelpool serve` process during the point. `cpu%` notes: CPU "
        "time used during the point (warm-up included) in % of one core, for the benchmark process (`gen`, the "
        "load generator), the launcher (`broker`) and the sum over the replicas (`workers`).",
        "- The pool reports no batch-size counter, so the mean batch size the workers ran is not measured here.",
        "", "## Systems", ""]
    out += [f"- {line}" for line in SYSTEM_TEXT]
    for wl in [w for w in WORKLOADS if any(r.workload == w for r in rows)]:
        out += ["", f"## Workload `{wl}`", "", WORKLOAD_TEXT[wl], "", table([r for r in rows if r.workload == wl])]
        if wl in plots:
            out += ["", f"![throughput vs requests in flight, {wl}]({plots[wl]})"]
    out += ["", "## Targets", "", "Measured through the public clients (`Client.submit`, `AsyncClient`); the raw "
            "DEALER rows are not a user API and count for no target.", "",
            "| target | system | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {t} | {s} | {m} | {v} |" for t, s, m, v in targets(rows)]
    cost = client_cost(rows)
    if cost:
        out += ["", "## What the clients cost", "",
                "Throughput through each public client as a share of the raw DEALER generator's at the same point "
                "(same pool, same run).", ""] + cost
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot(rows: list[Row], wl: str, path: Path) -> None:
    """Throughput vs requests in flight, one line per system and client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    mine = [r for r in rows if r.workload == wl and r.inflight != SEQ]
    for system, via in dict.fromkeys((r.system, r.via) for r in mine):
        pts = sorted((r.inflight, r.rps) for r in mine if r.system == system and r.via == via)
        style: dict = {}
        label = f"{system} ({via})" if system.startswith("modelpool-") else system
        if system == "in-process batch-N":
            style, label = {"linestyle": "--", "color": "gray"}, "in-process batch-N (ceiling)"
        elif via == RAW_VIA:
            style = {"linestyle": ":", "alpha": 0.7}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
    direct = find(rows, wl, "direct tf.function", SEQ)
    if direct and direct.rps:
        ax.axhline(direct.rps, color="black", linestyle=":", linewidth=1, label="direct tf.function, sequential")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({r.inflight for r in mine})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title(f"{wl}: throughput vs concurrency (one sample per request)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Sections of the page written by other scripts (`scripts/client_bench.py --write`,
# `scripts/bench_clients.py --write`), kept when `scripts/bench.py` rewrites the rest.
CLIENT_SECTION_START = "<!-- client_bench: begin -->"
CLIENT_SECTION_END = "<!-- client_bench: end -->"
CLIENTS_SECTION_START = "<!-- bench_clients: begin -->"
CLIENTS_SECTION_END = "<!-- bench_clients: end -->"
# Sections written by hand from scripts/bench_gateway.py and scripts/bench_reload.py runs.
HAND_SECTIONS = tuple((f"<!-- {name}: begin -->", f"<!-- {name}: end -->") for name in ("bench_gateway", "bench_reload"))
KEPT_SECTIONS = ((CLIENT_SECTION_START, CLIENT_SECTION_END), (CLIENTS_SECTION_START, CLIENTS_SECTION_END),
                 *HAND_SECTIONS)


def section_of(text: str, start_marker: str = CLIENT_SECTION_START, end_marker: str = CLIENT_SECTION_END) -> str:
    """A marked section of a page, markers included ('' when it has none)."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return ""
    return text[start:end + len(end_marker)]


def with_section(text: str, section: str, start_marker: str = CLIENT_SECTION_START,
                 end_marker: str = CLIENT_SECTION_END) -> str:
    """``text`` with its marked section replaced by ``section`` (appended when it has none)."""
    old = section_of(text, start_marker, end_marker)
    if old:
        return text.replace(old, section)
    return text.rstrip("\n") + "\n\n" + section + "\n" if section else text


def with_kept_sections(text: str, old_page: str) -> str:
    """A freshly written page with the other scripts' sections of the old page carried over."""
    for start, end in KEPT_SECTIONS:
        text = with_section(text, section_of(old_page, start, end), start, end)
    return text
