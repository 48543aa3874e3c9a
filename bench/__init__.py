"""Benchmark and pool-launching support for the source tree (not installed; see setup.cfg).

``bench.pool`` starts and stops real pools (used by the integration tests, ``scripts/bench.py`` and
``scripts/client_bench.py``); the other modules are the side-by-side benchmark behind ``scripts/bench.py``.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
