"""Start a torch.distributed world outside the Ray engine: entry scripts (SFT, reward
model fitting) and tests that need a few Megatron ranks in plain processes."""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Callable

import torch

RENDEZVOUS_TIMEOUT_S = 300.0


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, threads_per_rank: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` new processes that form one
    torch.distributed world (gloo on CPU, NCCL on GPU); a rank's exception is raised here.

    The rendezvous store lives in this process on a port it holds open for the whole run
    (no free-port probe that another process could take before the ranks bind it).
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, world_size=nprocs + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    mp.spawn(_entry, args=(fn, nprocs, store.port, threads_per_rank, args), nprocs=nprocs, join=True)


def init_single_process(threads: int = 0) -> None:
    """A world of one rank in this process (what ``MegatronModule.setup`` needs); no network
    rendezvous (an in-memory store)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from chatlearn.utils.dependency_logs import quiet_dependencies

    quiet_dependencies()
    if threads:
        torch.set_num_threads(threads)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from chatlearn.utils import platform

    dist.init_process_group(platform.dist_backend(), store=dist.HashStore(), rank=0, world_size=1)


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, threads: int, args: tuple) -> None:
    import torch.distributed as dist

    from chatlearn.utils import platform
    from chatlearn.utils.dependency_logs import quiet_dependencies

    quiet_dependencies()
    torch.set_num_threads(threads)  # several ranks share a few cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if platform.has_gpu():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    dist.init_process_group(platform.dist_backend(), store=store, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        # Only a rank that used Megatron has its parallel state to tear down; importing Megatron
        # just to find none costs a rank seconds.
        if "megatron.core.parallel_state" in sys.modules:
            from chatlearn.models.megatron.parallel import destroy_parallel_state

            destroy_parallel_state()
        dist.destroy_process_group()
