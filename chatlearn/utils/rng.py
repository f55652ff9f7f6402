"""Every random-number stream a worker draws from, captured and restored as one object.

A resumed run must draw what the uninterrupted run would have drawn, so a
checkpoint holds each rank's streams: Python's ``random``, NumPy's global
generator, torch's CPU generator, the CUDA generator of this rank's device
(GPU runs), and megatron's named model-parallel streams (its RNG tracker:
dropout inside tensor-parallel regions), when megatron is in use.
"""
from __future__ import annotations

import random
import sys
from typing import Any

import torch


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional for chatlearn itself
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _megatron_tracker()
    if tracker is not None:
        state["megatron_tracker"] = tracker.get_states()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng_state`` returned (streams it lacks stay as they are)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _megatron_tracker()
    if "megatron_tracker" in state and tracker is not None:
        tracker.set_states(state["megatron_tracker"])


def _megatron_tracker():
    """megatron's RNG tracker, if this process uses megatron and has seeded it."""
    if "megatron.core.tensor_parallel.random" not in sys.modules:
        return None
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None
