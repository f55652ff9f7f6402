"""Turns one episode's samples into global training batches.

Modes (``runtime.stream_data_loader_type``):

``fixed``
    An episode trains on exactly ``sample_per_episode`` samples, which must be a
    multiple of ``train_global_batch_size``; steps per epoch =
    ``sample_per_episode / train_global_batch_size``.
``dynamic``
    An episode trains on however many samples arrived (e.g. N responses per
    prompt, or only the online-DPO pairs with a winner); steps per epoch =
    ``ceil(total / train_global_batch_size)`` and the last global batch may be
    smaller. An episode may have no samples at all (every pair tied): it then has
    no steps. No sample is ever dropped.

Order: each of the ``num_training_epoch`` epochs visits every sample exactly
once. Epoch 0 uses arrival order; epoch ``e >= 1`` uses
``seeded_permutation(total, seed, episode_id, e)``. Global batch ``s`` of an
epoch is positions ``[s*G, (s+1)*G)`` of that order.

A step is a global batch: a list of samples. Each trainer splits it over its own
data-parallel ranks and micro-batches with
``chatlearn.data.batching.split_global_batch`` (trainers may differ in DP size),
which pads instead of dropping.

Streaming: the driver may start training before all rollouts are in.

    ds.start_episode(episode_id)
    for rollout_batch in rollouts:               # as they arrive
        ds.extend(split_batch(rollout_batch))
        for epoch, step, samples in ds.ready_batches():
            train(samples)                       # epoch 0 only
    ds.finish()
    for epoch, step, samples in ds.iter_train_batches():
        train(samples)                           # whatever was not handed out yet

``ready_batches()`` hands out the epoch-0 global batches whose samples have all
arrived (plus dynamic mode's short last batch once ``finish()`` was called).
``iter_train_batches()`` requires ``finish()`` and hands out everything not yet
handed out, in order. A step is handed out at most once per episode, whichever
method yields it. Without streaming, call ``set_samples`` and then
``iter_train_batches``.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence

from chatlearn.data.batching import Sample, seeded_permutation

MODES = ("fixed", "dynamic")


class TrainStep(NamedTuple):
    epoch: int
    step: int  # index of the global batch within its epoch
    samples: list[Sample]  # the global batch


class StreamDataset:
    """One episode's training data, cut into global batches."""

    def __init__(
        self,
        mode: str,
        sample_per_episode: int,
        train_global_batch_size: int,
        num_training_epoch: int = 1,
        seed: int = 1234,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"stream_data_loader_type must be one of {MODES}, got {mode!r}")
        for name, value in (
            ("sample_per_episode", sample_per_episode),
            ("train_global_batch_size", train_global_batch_size),
            ("num_training_epoch", num_training_epoch),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if mode == "fixed" and sample_per_episode % train_global_batch_size:
            raise ValueError(
                f"fixed mode: sample_per_episode ({sample_per_episode}) must be a multiple of "
                f"train_global_batch_size ({train_global_batch_size})"
            )
        self.mode = mode
        self.sample_per_episode = sample_per_episode
        self.global_batch_size = train_global_batch_size
        self.num_training_epoch = num_training_epoch
        self.seed = seed
        self._episode_id: Optional[int] = None
        self._samples: list[Sample] = []
        self._finished = False
        self._orders: dict[int, list[int]] = {}
        # Next (epoch, step) to hand out.
        self._epoch = 0
        self._step = 0

    # -- filling ---------------------------------------------------------------

    def start_episode(self, episode_id: int) -> None:
        """Forget the previous episode and start collecting samples for ``episode_id``."""
        self._episode_id = episode_id
        self._samples = []
        self._finished = False
        self._orders = {}
        self._epoch = 0
        self._step = 0

    def extend(self, samples: Sequence[Sample]) -> None:
        """Append samples in arrival order (use ``split_batch`` on a rollout batch)."""
        if self._episode_id is None:
            raise RuntimeError("StreamDataset.extend called before start_episode")
        if self._finished:
            raise RuntimeError(f"episode {self._episode_id} is finished; call start_episode first")
        if isinstance(samples, Mapping):
            raise TypeError("StreamDataset.extend takes a list of samples; use split_batch(batch) on a batch dict")
        samples = list(samples)
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping):
                raise TypeError(f"StreamDataset.extend: item {i} is {type(sample).__name__}, not a sample dict")
        if self.mode == "fixed" and len(self._samples) + len(samples) > self.sample_per_episode:
            raise ValueError(
                f"fixed mode expects exactly sample_per_episode={self.sample_per_episode} samples "
                f"per episode, got {len(self._samples) + len(samples)}"
            )
        self._samples.extend(samples)

    def finish(self) -> None:
        """Mark the episode's samples complete; checks the count in fixed mode."""
        if self._episode_id is None:
            raise RuntimeError("StreamDataset.finish called before start_episode")
        if self.mode == "fixed" and len(self._samples) != self.sample_per_episode:
            raise ValueError(
                f"fixed mode expects exactly sample_per_episode={self.sample_per_episode} samples "
                f"per episode, got {len(self._samples)}"
            )
        self._finished = True
        self._roll_epoch()

    def set_samples(self, episode_id: int, samples: Sequence[Sample]) -> None:
        """All of an episode's samples at once: start_episode + extend + finish."""
        self.start_episode(episode_id)
        self.extend(samples)
        self.finish()

    # -- sizes -----------------------------------------------------------------

    @property
    def episode_id(self) -> Optional[int]:
        return self._episode_id

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def finished(self) -> bool:
        return self._finished

    def num_steps_per_epoch(self) -> int:
        """Global batches per epoch; in dynamic mode known only after ``finish()``."""
        if self.mode == "fixed":
            return self.sample_per_episode // self.global_batch_size
        if not self._finished:
            raise RuntimeError("dynamic mode: the step count is known only after finish()")
        return math.ceil(len(self._samples) / self.global_batch_size)

    # -- handing out steps -------------------------------------------------------

    def ready_batches(self) -> Iterator[TrainStep]:
        """Epoch-0 global batches whose samples have all arrived and were not handed out."""
        while self._epoch == 0:
            start = self._step * self.global_batch_size
            end = start + self.global_batch_size
            if end > len(self._samples):
                if not self._finished or start >= len(self._samples):
                    return
                end = len(self._samples)  # dynamic mode's short last batch
            yield self._advance(list(range(start, end)))

    def iter_train_batches(self) -> Iterator[TrainStep]:
        """Every step of every epoch not yet handed out; requires ``finish()``."""
        if not self._finished:
            raise RuntimeError("iter_train_batches needs finish() (or set_samples) first")
        while self._epoch < self.num_training_epoch:
            order = self._order(self._epoch)
            start = self._step * self.global_batch_size
            yield self._advance(order[start : start + self.global_batch_size])

    def _advance(self, indices: list[int]) -> TrainStep:
        step = TrainStep(self._epoch, self._step, [self._samples[i] for i in indices])
        self._step += 1
        self._roll_epoch()
        return step

    def _roll_epoch(self) -> None:
        # While streaming, the cursor may sit at the end of epoch 0 until finish()
        # tells us (in dynamic mode) that epoch 0 really has no more steps.
        # An episode without samples has no steps: every epoch is over at once.
        while self._finished and self._epoch < self.num_training_epoch and self._step >= self.num_steps_per_epoch():
            self._epoch += 1
            self._step = 0

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            n = len(self._samples)
            assert self._episode_id is not None
            self._orders[epoch] = (
                list(range(n)) if epoch == 0 else seeded_permutation(n, self.seed, self._episode_id, epoch)
            )
        return self._orders[epoch]
