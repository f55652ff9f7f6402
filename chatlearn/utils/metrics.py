"""Metrics to JSON lines and TensorBoard under ``<output_dir>/<exp_name>``."""
from __future__ import annotations

import json
import math
import os
from typing import Optional


class MetricsWriter:
    def __init__(self, log_dir: str, tensorboard: bool = True):
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional on GPU images
                self._tb = None

    def write(self, episode: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        record = {"episode": episode, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, episode)
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_metrics(records: list[Optional[dict]], weights: Optional[list[float]] = None) -> dict[str, float]:
    """Average each numeric key over the records that have it (weighted by ``weights``, if given)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for i, record in enumerate(records):
        weight = 1.0 if weights is None else float(weights[i])
        for key, value in (record or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + float(value) * weight
                counts[key] = counts.get(key, 0.0) + weight
    return {k: sums[k] / counts[k] for k in sums if counts[k]}
