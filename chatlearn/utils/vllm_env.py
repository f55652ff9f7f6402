"""Environment settings that vLLM needs on a CPU-only machine.

vLLM reads most of its settings from environment variables, some of them once
at import time, so call :func:`configure_vllm_cpu_env` before ``import vllm``
(in every process that imports it: the driver, each Ray actor). On a machine
with a CUDA device it changes nothing.

Values that are already set in the environment are never overwritten, so a
user or a test can still choose differently.
"""
from __future__ import annotations

import os
import tempfile


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def configure_vllm_cpu_env(
    kv_cache_gib: int | None = 1, in_process: bool = True, force: bool = False
) -> dict[str, str]:
    """Set vLLM's CPU environment variables that are not set yet.

    Returns the variables this call set (empty on a CUDA machine, unless
    ``force``). ``in_process=False`` leaves the engine core in its own
    process (vLLM's default), for callers that want that isolation.

    ``kv_cache_gib=None`` leaves ``VLLM_CPU_KVCACHE_SPACE`` unset; the caller
    must then pass ``kv_cache_memory_bytes`` to ``vllm.LLM``. That is the
    better choice for tiny models: 32 MiB instead of the variable's minimum of
    1 GiB cut engine start from ~5.7 s to ~3 s and peak RSS from ~1.7 GiB to
    ~0.7 GiB (zeroing the cache dominates both). The variable, when set,
    overrides ``kv_cache_memory_bytes``.
    """
    if not force and cuda_available():
        return {}
    defaults = {
        # Run the engine core in this process: start takes ~4 s instead of
        # ~20 s, no `if __name__ == "__main__"` guard is needed for spawned
        # workers, and collective_rpc can hand tensors to the worker (the
        # in-process weight update path uses that).
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1",
        # vLLM writes its caches under ~/.cache/vllm by default; a temp dir
        # keeps runs from depending on (or polluting) the home directory,
        # which may be read-only. Keep it stable, not one per test: on a cold
        # cache vLLM inspects each model class in a subprocess that imports
        # vLLM (~10 s, measured on 2 cores); the result is cached here.
        "VLLM_CACHE_ROOT": os.path.join(tempfile.gettempdir(), f"chatlearn-vllm-cache-{os.getuid()}"),
        # The machines have no internet; the usage-stats reporter would only
        # spend time on failing connections.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if kv_cache_gib is not None:
        # The CPU backend sizes its KV cache from this (GiB, an integer); with
        # neither it nor kv_cache_memory_bytes, engine start fails sizing
        # memory. 1 GiB is plenty for small models and keeps several engines
        # on one 24 GiB machine.
        defaults["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    applied = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


# vLLM's multiprocess engines keep their message queues and CPU communicator
# buffers in /dev/shm under these prefixes; vllm-cpu 0.32.0 does not unlink
# some of them at shutdown (measured: one psm_* ring buffer of 160 MiB and the
# two vllm_dist_*cpushm_* files of a TP-2 engine stay behind).
_VLLM_SHM_PREFIXES = ("psm_", "vllm_dist_")


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name (field 2) may contain spaces; ppid follows its ")".
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def engine_shm_files(root_pid: int | None = None) -> set[str]:
    """vLLM's /dev/shm files mapped by this process or its descendants (its engine
    core and worker processes). Only files some process of ours maps are
    listed, so other engines on the same machine are never touched."""
    root_pid = os.getpid() if root_pid is None else root_pid
    files = set()
    for pid in {root_pid} | _descendants(root_pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode[, path]
            path = fields[5] if len(fields) == 6 else ""
            if path.startswith("/dev/shm/") and os.path.basename(path).startswith(_VLLM_SHM_PREFIXES):
                files.add(path)  # "(deleted)" paths never match an existing file below
    return files


def remove_files(paths: set[str]) -> list[str]:
    """Unlink the paths that still exist; returns those removed."""
    removed = []
    for path in sorted(paths):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed
