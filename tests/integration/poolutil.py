"""Start and stop real pools for integration tests: the shared launcher of ``bench/pool.py``, with the
tests' settings (fast heartbeats, ``mmi_detail``)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # `bench` is a folder of the source tree, not an installed package
    sys.path.insert(0, str(REPO))

from bench.pool import Pool, free_port, process_alive, toml_value, wait_until, write_config  # noqa: E402

__all__ = ["HERE", "REPO", "Pool", "free_port", "process_alive", "toml_value", "wait_until", "write_config"]
