"""What a run prints while it runs: one short line per episode and a sense of how far it is.

Every metric goes to metrics.jsonl and TensorBoard (``chatlearn.utils.metrics``); the console
gets the few a person watches: reward, KL, the algorithm's main loss, evaluation results,
and seconds per phase. ``runtime.debug`` prints every metric instead.

On a terminal, a tqdm bar shows episodes done and the ETA. When output goes to a file (a
job log), the ETA rides on each episode line, and while one episode runs longer than
``interval_s`` a line every ``interval_s`` says which phase it is in.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Optional

PHASES = ("environment", "train", "sync", "eval")
PHASE_LABELS = {"environment": "env"}
# The loss an algorithm optimises, first found wins (PPO's critic loss is loss/value).
MAIN_LOSSES = ("loss/policy", "loss/dpo", "loss")


def format_number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def episode_summary(metrics: dict[str, float]) -> str:
    """The watched metrics of one episode, e.g. ``reward 0.41 kl 0.012 loss/policy -0.03 |
    eval reward 0.53 (model 1.2, fn 0.31) | env 1.2s train 0.8s sync 0.1s eval 0.5s``."""
    train = [f"reward {format_number(metrics['reward/mean'])}"] if "reward/mean" in metrics else []
    if "kl" in metrics:
        train.append(f"kl {format_number(metrics['kl'])}")
    loss = next((key for key in MAIN_LOSSES if key in metrics), None)
    if loss is None:
        loss = next((key for key in sorted(metrics) if key.startswith("loss/")), None)
    if loss is not None:
        train.append(f"{loss} {format_number(metrics[loss])}")
    evaluation = []
    if "eval/reward/mean" in metrics:
        parts = [f"{key[len('eval/reward/'):]} {format_number(value)}" for key, value in metrics.items()
                 if key.startswith("eval/reward/") and key != "eval/reward/mean"]
        evaluation.append(f"eval reward {format_number(metrics['eval/reward/mean'])}"
                          + (f" ({', '.join(parts)})" if parts else ""))
    evaluation += [f"{key} {format_number(value)}" for key, value in metrics.items()
                   if key.startswith("eval/") and "accuracy" in key]
    phases = [f"{PHASE_LABELS.get(phase, phase)} {metrics[f'time/{phase}']:.1f}s" for phase in PHASES
              if f"time/{phase}" in metrics]
    return " | ".join(" ".join(group) for group in (train, evaluation, phases) if group)


def full_summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key}={format_number(value)}" for key, value in metrics.items())


class Progress:
    """Episodes ``start`` .. ``total``-1 of a run: the per-episode line, the bar or the heartbeat.

    ``phase(name)`` marks what the current episode is doing (for the heartbeat);
    ``episode_done(episode, metrics)`` prints the episode's line.
    """

    def __init__(self, start: int, total: int, logger: logging.Logger, *, interval_s: float = 60.0,
                 verbose: bool = False, terminal: Optional[bool] = None):
        self.start, self.total, self.logger, self.verbose = start, total, logger, verbose
        self.interval_s = interval_s
        self._began = time.monotonic()
        self._phase, self._phase_began, self._episode = "", self._began, start
        self._last_line = self._began
        self._lock = threading.Lock()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = None
        self._stop = threading.Event()
        if terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="episodes", unit="ep", dynamic_ncols=True)
        elif interval_s > 0 and total > start:
            threading.Thread(target=self._heartbeat, name="chatlearn-progress", daemon=True).start()

    def phase(self, name: str, episode: int) -> None:
        with self._lock:
            self._phase, self._phase_began, self._episode = name, time.monotonic(), episode

    def eta_s(self, episodes_done: int) -> Optional[float]:
        """Seconds left, from the mean time of the episodes this process ran."""
        if episodes_done <= 0:
            return None
        elapsed = time.monotonic() - self._began
        return elapsed / episodes_done * (self.total - self.start - episodes_done)

    def episode_done(self, episode: int, metrics: dict[str, float]) -> None:
        done = episode + 1 - self.start
        summary = full_summary(metrics) if self.verbose else episode_summary(metrics)
        eta = self.eta_s(done)
        timing = format_seconds(time.monotonic() - self._began)
        if eta is not None and episode + 1 < self.total:
            timing += f", eta {format_seconds(eta)}"
        line = f"episode {episode + 1}/{self.total} | {summary} | {timing}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
            self._bar.update(1)
        else:
            self.logger.info("%s", line)
        with self._lock:
            self._last_line = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.interval_s, 5.0)):
            with self._lock:
                now = time.monotonic()
                if now - self._last_line < self.interval_s or not self._phase:
                    continue
                self._last_line = now
                phase, in_phase, episode = self._phase, now - self._phase_began, self._episode
            self.logger.info("episode %d/%d: %s for %s (%s elapsed)", episode + 1, self.total, phase,
                             format_seconds(in_phase), format_seconds(now - self._began))

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
