"""The ``collective`` weight-sync transport: buckets broadcast over a process group made for the pair.

One trainer rank (the writer, rank 0) and every receiving process (each vLLM
worker process, or the receiving actor itself) form a group of their own,
apart from the trainer's and vLLM's own groups: gloo over TCP on CPU (so CI
runs it), NCCL on GPU. A sync broadcasts the trainer's HF-named state dict
bucket by bucket (the same bucket layout as the other transports,
``buckets.plan_buckets``): the writer packs bucket i+1 while bucket i is on the
wire, and each receiver hands a bucket's tensors to its loader as soon as the
bucket has arrived. No receiver needs the trainer's host: this is the path for
receivers on other GPUs or other nodes, where /dev/shm and CUDA IPC do not reach.

Groups are built from a ``TCPStore`` whose server runs in the writer, on a port
it picks; every member joins once (``join``), keyed by the pair's channel name,
and the group is kept for later syncs. ``torch.distributed``'s default group is
not touched (Megatron and vLLM own theirs).

Only torch is imported here: vLLM worker processes import this module to join.
"""
from __future__ import annotations

import datetime
import socket
import threading
from typing import Any, Iterator, Mapping, Optional

import torch

# channel -> (process group, rank, world size, device)
_GROUPS: dict[str, tuple[Any, int, int, torch.device]] = {}
# channel -> the writer's pending (state dict, bucket plan), from export to send
_OUTGOING: dict[str, tuple[Mapping[str, torch.Tensor], list[dict[str, Any]]]] = {}
# channel -> this receiver's buffer per bucket, kept between syncs: a loader may hold views of
# earlier buckets until its call ends (vLLM buffers a layer until all its parts arrived)
_INCOMING: dict[str, list[torch.Tensor]] = {}
_LOCK = threading.Lock()
JOIN_TIMEOUT = datetime.timedelta(minutes=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def join(channel: str, host: str, port: int, rank: int, world_size: int, secret: str) -> None:
    """Join the pair's group (rank 0, the writer, hosts the rendezvous store). Blocks until
    every member has joined. Joining a channel again replaces its group.

    ``secret`` (made by the driver, handed to the members over Ray or a server's token-guarded
    route) prefixes every rendezvous key: a process that reaches the store's port but lacks it
    finds no group to join."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=JOIN_TIMEOUT)
    store = dist.PrefixStore(f"chatlearn-weights/{channel}/{secret}", store)
    device = _device()
    if device.type == "cuda":
        group = dist.ProcessGroupNCCL(store, rank, world_size)
    else:
        group = dist.ProcessGroupGloo(store, rank, world_size, JOIN_TIMEOUT)
    with _LOCK:
        _GROUPS[channel] = (group, rank, world_size, device)
        _INCOMING.pop(channel, None)


def joined(channel: str) -> bool:
    return channel in _GROUPS


def _group(channel: str) -> tuple[Any, int, int, torch.device]:
    try:
        return _GROUPS[channel]
    except KeyError:
        raise RuntimeError(f"weight sync {channel}: this process has not joined the pair's group") from None


def _broadcast(group: Any, tensor: torch.Tensor) -> Any:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    return group.broadcast([tensor], options)


# -- writer ------------------------------------------------------------------------------
def stage(channel: str, state: Mapping[str, torch.Tensor], plan: list[dict[str, Any]]) -> None:
    """Keep the exported state and its bucket plan until ``send`` (the receivers learn the plan
    from the manifest first, then all sides meet in the broadcast)."""
    _OUTGOING[channel] = (state, plan)


def send(channel: str) -> dict[str, float]:
    """Broadcast the staged buckets through two buffers: bucket i is packed into the buffer that
    bucket i-2 was sent from, once that broadcast is done, while bucket i-1 is on the wire. On GPU
    the ordering lives on the streams (``Work.wait`` makes this process's stream wait for the
    broadcast, and NCCL starts a broadcast after the copies queued before it), so the host only
    waits at the end."""
    import time

    from chatlearn.synchronizer import buckets

    group, rank, _, device = _group(channel)
    if rank != 0:
        raise RuntimeError(f"weight sync {channel}: only the writer (rank 0) sends, this is rank {rank}")
    state, plan = _OUTGOING.pop(channel)
    start = time.perf_counter()
    biggest = max((b["nbytes"] for b in plan), default=1)
    buffers = [torch.empty(biggest, dtype=torch.uint8, device=device) for _ in range(2)]
    sending: list[Any] = [None, None]
    for i, bucket in enumerate(plan):
        slot = i % 2
        if sending[slot] is not None:
            sending[slot].wait()
        buffer = buffers[slot][:bucket["nbytes"]]
        for name, _, _, offset, nbytes in bucket["tensors"]:
            buffer[offset:offset + nbytes].copy_(buckets.flat_bytes(state[name], on_host=False), non_blocking=True)
        sending[slot] = _broadcast(group, buffer)
    for work in sending:
        if work is not None:
            work.wait()
    if device.type == "cuda":
        torch.cuda.current_stream().synchronize()  # done: the buffers and ``state`` may go
    return {"send_s": time.perf_counter() - start}


# -- receivers ---------------------------------------------------------------------------
def receive(channel: str, plan: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Each bucket of ``plan`` as it arrives: ``(bucket, its bytes)``. The bytes stay valid until
    the next sync on this channel rewrites them (as /dev/shm buckets do)."""
    group, rank, _, device = _group(channel)
    if rank == 0:
        raise RuntimeError(f"weight sync {channel}: the writer (rank 0) does not receive")
    with _LOCK:
        kept = _INCOMING.get(channel, [])
        if [b.numel() for b in kept] != [b["nbytes"] for b in plan]:
            kept = _INCOMING[channel] = [torch.empty(b["nbytes"], dtype=torch.uint8, device=device)
                                         for b in plan]
    for bucket, buffer in zip(plan, kept):
        _broadcast(group, buffer).wait()
        yield bucket, buffer
    if device.type == "cuda":
        # NCCL's wait only orders this process's stream: the loader's copies are queued, not
        # done. Finish them, so that the load time is true and the engine computes with them.
        torch.cuda.current_stream().synchronize()


def leave(channel: Optional[str] = None) -> None:
    """Forget a pair's group (all of them without ``channel``)."""
    with _LOCK:
        for name in ([channel] if channel else list(_GROUPS)):
            _GROUPS.pop(name, None)
            _INCOMING.pop(name, None)
            _OUTGOING.pop(name, None)
