"""Metrics of a run: written to JSON lines and TensorBoard under ``<output_dir>/<exp_name>``,
read back, averaged over records and merged over models."""
from __future__ import annotations

import json
import math
import os
from typing import Optional


class MetricsWriter:
    """Per-episode metrics of a run that starts (or resumes) at ``start_episode``.

    What an earlier, interrupted attempt logged for ``start_episode`` and later is cut
    away first (JSON lines rewritten atomically; TensorBoard events purged from that
    step on), so a resumed run logs every episode once, as an uninterrupted run would.
    A run from episode 0 starts both from scratch (its baseline evaluation, logged as
    episode -1, is made again).
    """

    def __init__(self, log_dir: str, start_episode: int = 0, tensorboard: bool = True):
        from chatlearn.utils.atomic import atomic_write_bytes

        os.makedirs(log_dir, exist_ok=True)
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        if os.path.exists(self.jsonl_path):
            kept = [r for r in read_metrics(self.jsonl_path) if start_episode > 0 and r["episode"] < start_episode]
            atomic_write_bytes(self.jsonl_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # Events at or after purge_step from an earlier attempt are dropped by readers.
                self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"),
                                         purge_step=start_episode if start_episode > 0 else -1)
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
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is left out."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


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


def merge_model_metrics(per_model: dict[str, dict[str, float]]) -> dict[str, float]:
    """One episode's metrics from several models: a metric only one model reports keeps its
    name (loss/policy, clipfrac); one that several report (grad_norm, lr) is kept per model
    (ppo_policy/grad_norm, ppo_value/grad_norm)."""
    owners: dict[str, int] = {}
    for metrics in per_model.values():
        for key in metrics:
            owners[key] = owners.get(key, 0) + 1
    return {(key if owners[key] == 1 else f"{name}/{key}"): value
            for name, metrics in per_model.items() for key, value in metrics.items()}
