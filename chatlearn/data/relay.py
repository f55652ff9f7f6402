"""Relay buffers: train on samples from several recent episodes.

``RelayBuffers`` keeps the samples of recent episodes and picks the training
samples of the current one.

Which episodes are kept (``max_relay_episode``, ``relay_episode_offset``):

* ``max_relay_episode == 0`` (relay off): only the current episode.
* ``episode_id < relay_episode_offset``: only the current episode; episodes
  before the offset are never relayed.
* otherwise the last ``max_relay_episode`` episodes, current one included
  (``-1`` keeps every episode since the offset). ``1`` is the same as off.

Which samples train (``select``):

* relay inactive for this episode -> the current episode's samples, in order;
* ``relay_sample_fn`` given -> ``relay_sample_fn(buffers)`` with the kept
  ``EpisodeRelayBuffer``s oldest first; it must return a non-empty list of dicts;
* otherwise the default sampler: ``num_samples`` samples (default: the size of
  the current episode) drawn uniformly WITHOUT replacement from all kept
  episodes. The draw is ``seeded_permutation(pool_size, seed, episode_id)``, so
  it depends only on the kept buffers, the seed and the episode id: it is
  deterministic and survives a resume. Drawn samples are returned in pool order
  (oldest episode first, arrival order within an episode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from chatlearn.data.batching import Sample, seeded_permutation

RelaySampleFn = Callable[[list["EpisodeRelayBuffer"]], list[Sample]]


@dataclass
class EpisodeRelayBuffer:
    """The samples one episode produced."""

    episode_id: int
    buffer: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.buffer)


class RelayBuffers:
    """Keeper of recent episodes' samples; see the module docstring for the rules."""

    def __init__(self, max_relay_episode: int = 0, relay_episode_offset: int = 0, seed: int = 1234) -> None:
        if max_relay_episode < -1:
            raise ValueError(f"max_relay_episode must be -1, 0 or positive, got {max_relay_episode}")
        self.max_relay_episode = max_relay_episode
        self.relay_episode_offset = relay_episode_offset
        self.seed = seed
        self._buffers: list[EpisodeRelayBuffer] = []

    @property
    def buffers(self) -> list[EpisodeRelayBuffer]:
        """Kept episodes, oldest first (a new list; the buffers themselves are shared)."""
        return list(self._buffers)

    def relay_active(self, episode_id: int) -> bool:
        return self.max_relay_episode != 0 and episode_id >= self.relay_episode_offset

    def add(self, episode_id: int, samples: list[Sample]) -> None:
        """Record an episode's samples. Re-adding the latest episode id replaces it."""
        if self._buffers and episode_id < self._buffers[-1].episode_id:
            raise ValueError(
                f"episode {episode_id} added after episode {self._buffers[-1].episode_id}; "
                "episodes must be added in increasing order"
            )
        if self._buffers and episode_id == self._buffers[-1].episode_id:
            self._buffers.pop()
        self._buffers.append(EpisodeRelayBuffer(episode_id, list(samples)))
        self._trim(episode_id)

    def _trim(self, episode_id: int) -> None:
        if not self.relay_active(episode_id):
            self._buffers = self._buffers[-1:]
            return
        self._buffers = [b for b in self._buffers if b.episode_id >= self.relay_episode_offset]
        if self.max_relay_episode > 0:
            self._buffers = self._buffers[-self.max_relay_episode :]

    def select(
        self,
        episode_id: int,
        relay_sample_fn: Optional[RelaySampleFn] = None,
        num_samples: Optional[int] = None,
    ) -> list[Sample]:
        """The training samples of ``episode_id``, which must be the latest one added.

        ``num_samples`` only applies to the default sampler; pass
        ``sample_per_episode`` in fixed mode, leave it ``None`` in dynamic mode.
        """
        if not self._buffers or self._buffers[-1].episode_id != episode_id:
            latest = self._buffers[-1].episode_id if self._buffers else None
            raise ValueError(f"select({episode_id}): the latest episode added is {latest}")
        current = self._buffers[-1]
        if not self.relay_active(episode_id):
            return list(current.buffer)
        if relay_sample_fn is not None:
            return _checked(relay_sample_fn(self.buffers), relay_sample_fn)
        pool = [s for b in self._buffers for s in b.buffer]
        k = len(current.buffer) if num_samples is None else num_samples
        if not 0 <= k <= len(pool):
            raise ValueError(
                f"relay: cannot draw {k} samples without replacement from {len(pool)} kept samples"
            )
        picked = sorted(seeded_permutation(len(pool), self.seed, episode_id)[:k])
        return [pool[i] for i in picked]

    def state_dict(self) -> dict[str, Any]:
        """torch.save-able state: plain lists/dicts holding the samples as they are."""
        return {
            "max_relay_episode": self.max_relay_episode,
            "relay_episode_offset": self.relay_episode_offset,
            "seed": self.seed,
            "buffers": [{"episode_id": b.episode_id, "buffer": list(b.buffer)} for b in self._buffers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore kept episodes and the seed; the window settings stay the constructor's
        (a changed config trims the restored episodes at once)."""
        self.seed = state["seed"]
        self._buffers = [EpisodeRelayBuffer(int(b["episode_id"]), list(b["buffer"])) for b in state["buffers"]]
        if self._buffers:
            self._trim(self._buffers[-1].episode_id)


def _checked(result: Any, fn: Callable) -> list[Sample]:
    name = getattr(fn, "__name__", repr(fn))
    if not isinstance(result, list):
        raise TypeError(f"relay_sample_fn {name} must return a list of sample dicts, got {type(result).__name__}")
    if not result:
        raise ValueError(f"relay_sample_fn {name} returned an empty list; training needs at least one sample")
    for i, sample in enumerate(result):
        if not isinstance(sample, dict):
            raise TypeError(
                f"relay_sample_fn {name} must return a list of sample dicts; item {i} is {type(sample).__name__}"
            )
    return result
