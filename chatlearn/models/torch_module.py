"""Plain-PyTorch modules: small models, rule-based rewards, tests.

Set ``self.model`` (an ``nn.Module``) and, for trainers, ``self.optimizer`` in
``setup()``. Checkpoints, weight sync and offloading then work without more
code: weights travel under their ``state_dict`` names, which for a Hugging
Face model are already the canonical Hugging Face names. A module that sets
no ``self.model`` holds no weights: a parameter sync with it is a no-op.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from chatlearn.models.base import BaseModule
from chatlearn.models.offload import HostOffload, model_tensors, offload_target_available
from chatlearn.utils import platform
from chatlearn.utils.rng import capture_rng_state, restore_rng_state


class TorchModule(BaseModule):
    model: Optional[torch.nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    _host: Optional[HostOffload] = None

    @property
    def device(self) -> torch.device:
        return platform.torch_device()

    # -- checkpoints -------------------------------------------------------------
    def _rank_file(self, path: str) -> str:
        rank = self.worker.rank if self.worker else 0
        return os.path.join(path, f"rank_{rank:03d}.pt")

    def save_checkpoint(self, path: str) -> None:
        from chatlearn.utils.atomic import atomic_torch_save

        state = {
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            # RNG states, so a resumed run samples exactly as the uninterrupted one would.
            "rng": capture_rng_state(),
        }
        os.makedirs(path, exist_ok=True)
        atomic_torch_save(state, self._rank_file(path))

    def load_checkpoint(self, path: str) -> None:
        file = self._rank_file(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"model {self.name!r}: no checkpoint shard at {file}")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if self.model is not None and state["model"] is not None:
            self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])

    # -- weight sync -------------------------------------------------------------
    def has_weights(self) -> bool:
        """A TorchModule without ``self.model`` (a rule-based reward, a 1.x module that never set
        one) takes part in a parameter sync as a no-op."""
        return self.model is not None

    def named_parameters_for_sync(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        target = self.device if device == "cuda" else torch.device(device)
        return {name: t.detach().to(target) for name, t in self.model.state_dict().items()}

    def load_parameters_from_sync(self, params: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        missing = sorted(set(own) - set(params))
        unexpected = sorted(set(params) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"model {self.name!r}: weight sync names do not match "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        with torch.no_grad():
            for name, tensor in params.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(
                        f"model {self.name!r}: {name} has shape {tuple(own[name].shape)}, "
                        f"sync sent {tuple(tensor.shape)}"
                    )
                own[name].copy_(tensor)

    # -- memory ------------------------------------------------------------------
    def offload(self) -> None:
        """Weights, buffers, optimizer state and gradients to host memory, in place
        (chatlearn/models/offload.py); on CPU nothing to do."""
        if self.model is None or not offload_target_available():
            return
        self._host = self._host or HostOffload()  # made here: subclasses need not call an __init__
        self._host.offload(*model_tensors(self.model, [self.optimizer] if self.optimizer is not None else []))

    def onload(self) -> None:
        if self._host is not None:
            self._host.onload()
