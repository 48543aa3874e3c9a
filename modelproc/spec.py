"""The frozen, picklable description a spawned worker starts from (no TensorFlow here)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs; built by the supervisor, passed to the spawn target."""

    model: str
    path: str
    backend: str
    identity: bytes
    version: str = "1"
    max_batch_size: int = 32
    prefetch: int = 1  # batches this worker takes ahead of the one it runs
    pad_to_bucket: bool = False
    intra_threads: int = 1
    inter_threads: int = 1
    device: str = "cpu"
    imports: tuple[str, ...] = ()
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    parent_pid: int = 0  # local workers exit when this process is gone; 0 for a remote worker
    orphan_timeout: float = 0.0  # remote workers: exit after this long without a broker (0 = never)
    log_level: str = "INFO"
