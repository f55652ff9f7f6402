"""megatron-core backend: TP/PP Llama/Qwen2/Qwen3 models built from Hugging Face checkpoints.

Importing this package does not import megatron; ``MegatronModule`` is loaded on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["MegatronModule", "MegatronSettings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from chatlearn.models.megatron import module

        return getattr(module, name)
    raise AttributeError(name)
