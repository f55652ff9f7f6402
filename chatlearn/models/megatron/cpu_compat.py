"""Make megatron-core 0.16.1 run on CPU with gloo.

megatron-core assumes a CUDA device in a handful of places that config flags
cannot switch off. This module is the ONE place that papers over them, and
only in a process without a GPU (``chatlearn.utils.platform.has_gpu()``):

* :func:`apply` patches process-wide functions (idempotent);
* :func:`cpu_device_mode` is a context manager that maps ``device="cuda"``,
  ``Tensor.cuda()`` and ``Tensor.type()`` to their CPU equivalents while
  megatron code runs (schedules, optimizer, grad clipping, DDP buffers).

On a GPU machine both are no-ops. Nothing in site-packages is edited.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from chatlearn.utils import platform

_APPLIED = False


def needed() -> bool:
    return not platform.has_gpu()


class _CpuRNGStatesTracker:
    """Stand-in for megatron's ``CudaRNGStatesTracker`` that forks the CPU generator.

    Megatron keeps separate RNG streams for tensor-parallel regions (dropout,
    weight init of sharded layers) in CUDA generators; on CPU the only
    generator is the default one, so each named stream is a saved CPU state.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def apply() -> None:
    """Patch megatron's process-wide CUDA assumptions (no-op with a GPU; idempotent)."""
    global _APPLIED
    if _APPLIED or not needed():
        return
    import megatron.core.tensor_parallel.random as mrandom

    # p2p_communication and the schedules call torch.cuda.current_device() for
    # the device of shape/receive buffers, and synchronize() after batched
    # isend/irecv; a CPU-only torch raises on both.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # model_parallel_cuda_manual_seed and the tracker read/write CUDA
    # generator states; route them to the CPU generator instead.
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.CudaRNGStatesTracker = _CpuRNGStatesTracker  # what initialize_rng_tracker instantiates
    # get_all_rng_states() checks isinstance(tracker, CudaRNGStatesTracker):
    # the replaced class above keeps that check true.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    _APPLIED = True


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "cuda:<int>" to torch factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites megatron's hard-coded CUDA tensor placement to CPU.

    Covers ``torch.zeros(..., device="cuda")`` (schedules, optimizer, grad
    clipping, DDP buffers), ``t.cuda()`` (optimizer state loading) and
    ``t.type() == "torch.cuda.FloatTensor"`` checks (optimizer, clip_grads),
    which would otherwise reject every CPU parameter.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            name = func(*args, **kwargs)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_device_mode() -> Iterator[None]:
    """Run megatron code with CUDA placement mapped to CPU (no-op with a GPU)."""
    if not needed():
        yield
        return
    apply()
    with _CudaToCpuMode():
        yield
