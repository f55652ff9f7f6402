"""Streaming asynchronous rollouts: ``runtime.policy_lag_mode: streaming``.

Fixed lag (``policy_lag_mode: fixed``, ``_run_lagged_environment`` in engine.py)
trains episode t on exactly the rollouts of episode t-k's prompts. Streaming
loosens that to the generation *batch*:

* generation runs ahead: at the start of each episode, batches are launched
  until ``policy_lag + 1`` episodes' worth of prompts are generating or
  generated-but-untrained (so a batch is trained on within ``policy_lag`` syncs
  unless batches finish out of order), each with the policy's weights of the
  moment; a weight sync queues behind the batches already launched, so new
  weights reach the generators between generation batches;
* an episode trains on the oldest batches already finished, whichever episode's
  prompts they answer, and waits only when too few are; a batch whose policy
  version is more than ``policy_lag`` versions behind the trainer's is dropped
  (``async/dropped_stale_samples``), never trained on;
* every sample keeps the version that sampled it: the rollout dump records it
  per sample, and ``async/staleness/*`` histograms it per episode.

A batch is the unit (a GRPO group or an online-DPO pair lies inside one batch,
so it comes from one policy version). Batches finish out of order only when
every stage of the environment flow can overtake: Ray runs an actor's calls
in the order they were made, so a stage with one replica (a reward model, say)
hands batches on in launch order. Then an episode trains on what fixed lag
would give it. With replicas at every stage, the trainer takes the batches
that finished and does not wait for the slowest.
Before a checkpoint the batches in flight are collected (``drain``), so a
resumed run keeps every generated sample and trains none twice.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from chatlearn.runtime.engine import Engine, Rollouts

logger = logging.getLogger(__name__)


@dataclass
class GenerationBatch:
    """One environment-flow call over a slice of one episode's prompts."""

    episode: int  # whose prompts (and request seeds) it samples
    first_index: int  # of its first prompt within that episode's prompts
    num_prompts: int
    version: int  # the policy version sampling it
    outputs: Optional[collections.deque] = None  # while generating: the flow's output refs
    samples: list[dict] = field(default_factory=list)  # once collected: the training samples
    raw: list[dict] = field(default_factory=list)  # the environment's samples (rollout_dump_dir)
    metrics: Optional[dict[str, float]] = None  # the rollout processor's, for this batch
    rows: int = 0  # the environment's output rows (metric weights)


class StreamingRollouts:
    """The generation batches of a streaming run: launched, collected, handed to episodes."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.lag = engine.runtime.policy_lag
        self.prompts_per_episode = engine.runtime.sample_per_episode
        self.generating: list[GenerationBatch] = []  # launched, oldest first
        self.ready: list[GenerationBatch] = []  # collected, not trained on
        self.next_episode = 0  # the next episode whose prompts are drawn
        self.unlaunched: list = []  # drawn prompts of episode next_episode - 1 not launched yet
        self.next_index = 0

    # -- an episode's rollouts ---------------------------------------------------------
    def take(self, episode: int) -> tuple["Rollouts", dict[str, float]]:
        """The batches episode ``episode`` trains on (one episode's worth of prompts, oldest
        finished first), and the async metrics; leaves generation running for later episodes."""
        from chatlearn.runtime.engine import Rollouts

        current = self._version()
        dropped = 0
        taken: list[GenerationBatch] = []
        self._top_up(self.prompts_per_episode)
        while sum(b.num_prompts for b in taken) < self.prompts_per_episode:
            fresh = [b for b in self.ready if current - b.version <= self.lag]
            dropped += sum(len(b.samples) for b in self.ready if current - b.version > self.lag)
            self.ready = fresh
            if self.ready:
                oldest = min(self.ready, key=lambda b: (b.version, b.episode, b.first_index))
                self.ready.remove(oldest)
                taken.append(oldest)
                continue
            if not self.generating:  # stale drops starved the run: draw more prompts
                self._launch_next(force=True)
            self._collect_one()
        samples = [s for b in taken for s in b.samples]
        metrics = self.engine._rollout_metrics(len(samples), [b.metrics for b in taken], [b.rows for b in taken])
        versions = tuple(b.version for b in taken for _ in b.raw)
        rollouts = Rollouts(episode, min(b.version for b in taken), samples, metrics,
                            [r for b in taken for r in b.raw], versions)
        return rollouts, self._metrics(current, taken, dropped)

    def _metrics(self, current: int, taken: list[GenerationBatch], dropped: int) -> dict[str, float]:
        staleness = [current - b.version for b in taken for _ in b.samples]
        metrics = {"async/policy_lag": float(max(staleness, default=0)),
                   "async/staleness/mean": sum(staleness) / max(len(staleness), 1),
                   "async/dropped_stale_samples": float(dropped),
                   "async/in_flight_prompts": float(self._outstanding_prompts()),
                   "async/generated_episode": float(min(b.episode for b in taken))}
        histogram = collections.Counter(staleness)
        metrics.update({f"async/staleness/{lag}": float(histogram.get(lag, 0)) for lag in range(self.lag + 1)})
        return metrics

    # -- generation -------------------------------------------------------------------
    def _version(self) -> int:
        return self.engine.weight_versions.get(self.engine.environment.graph[0].model, 0)

    def _outstanding_prompts(self) -> int:
        return sum(b.num_prompts for b in self.generating + self.ready)

    def _top_up(self, still_needed: int) -> None:
        """Launch batches while fewer prompts are generating or generated than this episode still
        needs plus ``policy_lag`` episodes' worth: a batch launched now, with the current weights,
        is then trained on within ``policy_lag`` syncs (the syncs come one per episode), unless
        batches finish out of order. No prompts are drawn past the run's last episode."""
        while self._outstanding_prompts() < still_needed + self.lag * self.prompts_per_episode:
            if not self._launch_next():
                break

    def _launch_next(self, force: bool = False) -> bool:
        engine = self.engine
        if not self.unlaunched:
            if self.next_episode >= engine.runtime.num_episode and not force:
                return False
            self.unlaunched = list(engine._episode_prompts(self.next_episode))
            self.next_episode, self.next_index = self.next_episode + 1, 0
        size = engine._generation_batch_size(engine.environment)
        chunk, self.unlaunched = self.unlaunched[:size], self.unlaunched[size:]
        episode = self.next_episode - 1
        outputs = engine._launch_flow(engine.environment, chunk, episode, first_index=self.next_index)
        self.generating.append(GenerationBatch(episode, self.next_index, len(chunk), self._version(), outputs))
        self.next_index += len(chunk)
        return True

    def _collect_one(self) -> None:
        """Wait for the first generating batch to finish (any of them); process it."""
        index = self.engine.tracker.first_done([[o.ref for o in b.outputs[0]] for b in self.generating])
        batch = self.generating.pop(index)
        merged, _ = next(self.engine._collect_flow(batch.outputs))
        batch.outputs = None
        batch.samples, batch.metrics, batch.rows, batch.raw = self.engine._process_batch(merged, batch.episode)
        self.ready.append(batch)

    def drain(self) -> None:
        """Collect every batch still generating (before a checkpoint)."""
        while self.generating:
            self._collect_one()

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.generating:
            raise RuntimeError("StreamingRollouts.state_dict() with batches still generating: drain() first")
        return {"ready": [asdict(b) for b in self.ready], "next_episode": self.next_episode,
                "unlaunched": list(self.unlaunched), "next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ready = [GenerationBatch(**b) for b in state["ready"]]
        self.next_episode, self.next_index = int(state["next_episode"]), int(state["next_index"])
        self.unlaunched = list(state["unlaunched"])
        if self.ready:
            logger.info("resume: kept %d generated, untrained sample(s) in %d batch(es) from the checkpoint "
                        "(policy version(s) %s); they are trained on, not regenerated",
                        sum(len(b.samples) for b in self.ready), len(self.ready),
                        sorted({b.version for b in self.ready}))
