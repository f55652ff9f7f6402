"""Give a model's device memory back while it is idle, and take it again, in place.

``free_memory: true`` makes the engine call a module's ``offload()`` before
phases the model sits out and ``onload()`` before its turn (see
``Engine._phase``). Colocated roles on one GPU then take turns with the
memory: the trainers' weights, gradients and Adam moments are on the host
while vLLM generates, and vLLM sleeps while they train.

The storage of each tensor is copied to host memory and resized to zero;
onload resizes it back and copies the bytes in. The tensor objects, and
every view of the same storage (megatron's parameters inside its contiguous
buffers, ``main_grad`` views, optimizer shards), stay the same Python objects,
so the optimizer, the DDP hooks and the weight-sync code that hold them see
the same values afterwards. Megatron's own buffer offload (``offload_to_cpu``
in ``param_and_grad_buffer.py``) uses the same trick for its buffers only.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

from chatlearn.utils import platform


def offload_target_available() -> bool:
    """Whether offloading frees anything: only device memory has a cheaper place (the host) to go.

    ``CHATLEARN_OFFLOAD_ON_CPU=1`` runs the same moves on CPU, where they free
    nothing (the host copy takes what the tensor gave back): for tests and for
    debugging the offload path without a GPU.
    """
    return platform.has_gpu() or os.environ.get("CHATLEARN_OFFLOAD_ON_CPU", "0") == "1"


class HostOffload:
    """Moves the storages behind a set of tensors to host memory and back.

    ``offload(keep=..., drop=...)``: the storages of ``keep`` are copied to
    the host and freed; those of ``drop`` (gradients, recomputed every step)
    are freed without a copy and come back zeroed. A storage reached from
    several tensors is handled once; empty storages are skipped.
    """

    def __init__(self) -> None:
        self._saved: list[tuple[torch.UntypedStorage, int, Optional[torch.Tensor]]] = []
        # Host buffers kept from one offload to the next (pinned allocation is slow), by position:
        # a model offloads the same tensors in the same order every time.
        self._host_buffers: list[torch.Tensor] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._saved)

    @property
    def offloaded_bytes(self) -> int:
        return sum(nbytes for _, nbytes, _ in self._saved)

    def offload(self, keep: Iterable[torch.Tensor], drop: Iterable[torch.Tensor] = ()) -> int:
        """Free the storages; returns the bytes freed. Idempotent while offloaded."""
        if self._saved:
            return 0
        seen: set[tuple[str, int]] = set()
        copies = 0  # host buffers handed out so far: the next one's index
        pin = platform.has_gpu()  # device tensors: pinned host copies
        for tensors, copy in ((keep, True), (drop, False)):
            for tensor in tensors:
                if pin and tensor.device.type == "cpu":
                    continue  # already on the host (Adam's step counter)
                storage = tensor.untyped_storage()
                nbytes, key = storage.nbytes(), (str(tensor.device), storage.data_ptr())
                if nbytes == 0 or key in seen:
                    continue
                seen.add(key)
                host = None
                if copy:
                    host = self._host_buffer(copies, nbytes, pin)
                    host.untyped_storage().copy_(storage)
                    copies += 1
                self._saved.append((storage, nbytes, host))
        if pin:
            torch.cuda.synchronize()
        for storage, _, _ in self._saved:
            storage.resize_(0)
        if pin:
            torch.cuda.empty_cache()  # back to the driver, so another process (vLLM) can use it
        return self.offloaded_bytes

    def _host_buffer(self, index: int, nbytes: int, pin: bool) -> torch.Tensor:
        if index == len(self._host_buffers):
            self._host_buffers.append(torch.empty(0, dtype=torch.uint8))
        if self._host_buffers[index].numel() != nbytes:
            self._host_buffers[index] = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin)
        return self._host_buffers[index]

    def onload(self) -> None:
        """Reallocate every storage and restore its bytes (zeros for dropped ones)."""
        for storage, nbytes, host in self._saved:
            storage.resize_(nbytes)
            if host is None:
                _bytes_view(storage).zero_()
            else:
                storage.copy_(host.untyped_storage())
        if self._saved and platform.has_gpu():
            torch.cuda.synchronize()
        self._saved = []


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))


def model_tensors(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(keep, drop)`` for :meth:`HostOffload.offload`: what a model and its torch optimizers hold.

    Kept: the model's parameters and buffers, each optimizer's parameters (the fp32
    master copies when a mixed-precision wrapper made them) and their state (Adam's
    moments). Dropped: gradients, including megatron DDP's ``main_grad`` views of its
    contiguous grad buffer.
    """
    params = list(model.parameters())
    # (nn.Module's method by name: megatron's DDP wrapper has a `buffers` attribute, its grad buffers.)
    keep = params + list(torch.nn.Module.buffers(model))
    for optimizer in optimizers:
        opt_params = [p for group in optimizer.param_groups for p in group["params"]]
        keep += opt_params + [v for state in optimizer.state.values() for v in state.values()
                              if isinstance(v, torch.Tensor)]
        params += opt_params
    drop = [g for p in params for g in (getattr(p, "main_grad", None), p.grad) if g is not None]
    return keep, drop
