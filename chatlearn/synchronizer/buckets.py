"""Bucketed weight transport for the parameter sync.

The trainer's full Hugging Face state dict is cut into *buckets* of at most
``runtime.coalesced_buffer_mb`` (a tensor larger than that travels alone in
its own bucket: tensors are never split, because vLLM's loader needs each HF
tensor whole). A bucket is one flat byte buffer; a *manifest* says where each
bucket lives and where each tensor sits inside it. Manifests are plain
dicts, lists, strings and ints, so that they pass through Ray and through
vLLM's RPC to its worker processes unchanged.

Two transports:

``shm``
    Each bucket is a file under ``/dev/shm`` (RAM-backed tmpfs) on the
    trainer's node. The writer keeps its files and their ``MAP_SHARED``
    mappings from one sync to the next: a rewrite then costs one memcpy, while
    writing into freshly created tmpfs pages costs ~5x more (page allocation
    and zeroing dominate, measured in docs/vllm.md). Readers map the files
    (no copy), keep their mappings too, and hand views to the loader. This is
    the only route into vLLM's worker *processes* (tensor-parallel engines),
    where tensors do not survive vLLM's RPC but a path does.
``object_store``
    Each bucket is a list of per-tensor byte arrays in Ray's object store
    (numpy arrays travel out of band: one copy into the store, zero-copy
    reads). Works across nodes; on one node about as fast as ``shm`` once
    warm (docs/vllm.md), but unreachable from vLLM's worker processes.

``collective``
    A process group of the writer and every receiving process, made for the
    pair (gloo on CPU, NCCL on GPU): the writer broadcasts bucket after
    bucket, each receiver loads a bucket once it has arrived
    (``chatlearn.synchronizer.collective``). Reaches receivers on other
    devices and other nodes.

``cuda_ipc``
    GPU runs where a trainer rank and the receiver share a GPU: each bucket
    is one GPU buffer of the trainer rank, passed as a CUDA IPC handle
    (``torch.multiprocessing.reductions.reduce_tensor``); the receiver maps it
    and loads straight from it, device to device, with no host copy. The
    writer keeps its buffers until the receivers report back
    (:func:`release_cuda_ipc`).

Readers stream the tensors of all buckets, bucket after bucket, into ONE
loader call (:func:`iter_manifest`): vLLM's ``reload_weights`` must see every
part of a fused layer (q/k/v, gate/up) in the same call (see docs/vllm.md).

This module imports only torch (and Ray lazily): vLLM worker processes import
it to read buckets.
"""
from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import threading
import time
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

SHM = "shm"
OBJECT_STORE = "object_store"
CUDA_IPC = "cuda_ipc"
COLLECTIVE = "collective"
TRANSPORTS = (SHM, OBJECT_STORE, CUDA_IPC, COLLECTIVE)

SHM_ROOT = "/dev/shm"
# Offsets inside a bucket are aligned so that a view of any dtype is aligned.
ALIGN = 64
# Keep this much of /dev/shm free: a write into a full tmpfs mapping is a
# SIGBUS that kills the process, not an exception.
SHM_HEADROOM_BYTES = 64 * 2**20
_POOL_PREFIX = "chatlearn-sync-"

# Manifest tensor entries: [name, dtype, shape, offset, nbytes].
_NAME, _DTYPE, _SHAPE, _OFFSET, _NBYTES = range(5)


class ShmSpaceError(RuntimeError):
    """/dev/shm is missing or too small for the buckets of one sync."""


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------

def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight-sync manifest")
    return dtype


def plan_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[dict[str, Any]]:
    """Group the tensors of ``state`` (in its order) into buckets of at most ``bucket_bytes``.

    Returns bucket manifests without a location: ``{"nbytes", "tensors"}``.
    Order is kept, so a name-sorted state dict keeps each decoder layer's
    tensors together (vLLM's layerwise loader buffers a layer until all its
    parts arrived; keeping them adjacent keeps that buffer to one layer).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    buckets: list[dict[str, Any]] = []
    current: list[list[Any]] = []
    size = 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight sync: {name!r} is a {type(tensor).__name__}, not a tensor")
        nbytes = tensor_nbytes(tensor)
        offset = _aligned(size)
        if current and offset + nbytes > bucket_bytes:
            buckets.append({"nbytes": size, "tensors": current})
            current, offset = [], 0
        current.append([name, dtype_name(tensor.dtype), list(tensor.shape), offset, nbytes])
        size = offset + nbytes
    if current:
        buckets.append({"nbytes": size, "tensors": current})
    return buckets


def manifest_shapes(manifest: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {e[_NAME]: tuple(e[_SHAPE]) for b in manifest["buckets"] for e in b["tensors"]}


def manifest_nbytes(manifest: Mapping[str, Any]) -> int:
    """Payload bytes (tensor data, without alignment padding)."""
    return sum(e[_NBYTES] for b in manifest["buckets"] for e in b["tensors"])


def flat_bytes(tensor: torch.Tensor, on_host: bool = True) -> torch.Tensor:
    """The tensor's bytes as a 1-D uint8 view (a copy only if it is not contiguous), moved to
    host memory unless ``on_host`` is False (a GPU-to-GPU copy must not detour through the host:
    that detour cost the NCCL sync of a 988 MB model 0.43 s of its 0.45 s on an H200 pair)."""
    t = tensor.detach()
    if on_host and t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous().reshape(-1).view(torch.uint8)


def _view(buffer: torch.Tensor, entry: Sequence[Any]) -> torch.Tensor:
    start, nbytes = entry[_OFFSET], entry[_NBYTES]
    return buffer[start:start + nbytes].view(dtype_from_name(entry[_DTYPE])).view(tuple(entry[_SHAPE]))


# ---------------------------------------------------------------------------
# Shared-memory files (writer side)
# ---------------------------------------------------------------------------

def shm_available_bytes(root: str = SHM_ROOT) -> int:
    try:
        st = os.statvfs(root)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


# Held (flock, exclusive) by a pool's writer for as long as it lives; the kernel drops it when the
# process dies, however it dies. Unlike a pid, a lock means the same in every PID namespace that
# shares /dev/shm (containers on one host), so a live pool of another job is never taken for stale.
_OWNER_LOCK = ".owner.lock"


def _owner_gone(directory: str) -> bool:
    lock = os.path.join(directory, _OWNER_LOCK)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        # A pool being created (its lock comes next), or one written by an older chatlearn without
        # locks: judge by the writer's pid in the name, and only when that process is gone here.
        match = re.match(re.escape(_POOL_PREFIX) + r"(\d+)-", os.path.basename(directory))
        return bool(match) and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1)))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its writer is alive
    finally:
        os.close(fd)  # releases the lock if we took it
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_pools(root: str = SHM_ROOT) -> list[str]:
    """Delete bucket directories whose writer process is gone.

    A writer killed with SIGKILL (``ray.kill`` at engine shutdown) cannot
    remove its files, and tmpfs files hold RAM until deleted; the next writer
    on the node cleans up. A writer holds an exclusive lock on its
    directory's ``.owner.lock`` while it lives: a directory whose lock can be
    taken belongs to nobody.
    """
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        directory = os.path.join(root, name)
        if name.startswith(_POOL_PREFIX) and os.path.isdir(directory) and _owner_gone(directory):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(name)
    return removed


class ShmBucketPool:
    """One writer's bucket files, kept mapped between syncs.

    The first sync creates the files; later syncs of the same layout rewrite
    them through the mappings they already have (one memcpy per byte). A
    bucket whose size changed is recreated. Files are removed at process exit
    (and by :func:`remove_stale_pools` after a SIGKILL).
    """

    def __init__(self, channel: str, root: str = SHM_ROOT):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", channel)
        self.root = root
        self.directory = os.path.join(root, f"{_POOL_PREFIX}{os.getpid()}-{safe}")
        self._maps: list[tuple[str, int, torch.Tensor]] = []  # (path, nbytes, uint8 mapping)
        self._lock = threading.Lock()
        self._owner_fd: Optional[int] = None  # holds the directory's owner lock

    def _claim(self) -> None:
        """Create the directory and hold its owner lock (once per process)."""
        if self._owner_fd is not None:
            return
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(os.path.join(self.directory, _OWNER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._owner_fd = fd

    def _mapping(self, index: int, nbytes: int) -> tuple[str, torch.Tensor]:
        if index < len(self._maps) and self._maps[index][1] == nbytes:
            path, _, buf = self._maps[index]
            return path, buf
        path = os.path.join(self.directory, f"bucket-{index:05d}.bin")
        if os.path.exists(path):
            os.unlink(path)
        # shared=True: MAP_SHARED, the file is created with this size.
        buf = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
        entry = (path, nbytes, buf)
        if index < len(self._maps):
            self._maps[index] = entry
        else:
            self._maps.append(entry)
        return path, buf

    def write(self, state: Mapping[str, torch.Tensor], bucket_bytes: int) -> dict[str, Any]:
        """Copy ``state`` into the pool's files; returns the manifest."""
        buckets = plan_buckets(state, bucket_bytes)
        total = sum(b["nbytes"] for b in buckets)
        reusable = sum(n for i, (_, n, _) in enumerate(self._maps)
                       if i < len(buckets) and buckets[i]["nbytes"] == n)
        needed = total - reusable
        free = shm_available_bytes(self.root)
        if needed + SHM_HEADROOM_BYTES > free:
            raise ShmSpaceError(
                f"{self.root} has {free / 2**20:.0f} MiB free, the weight sync needs "
                f"{needed / 2**20:.0f} MiB more (+{SHM_HEADROOM_BYTES // 2**20} MiB headroom); "
                "enlarge it (docker: --shm-size) or use the object_store transport"
            )
        with self._lock:
            remove_stale_pools(self.root)
            self._claim()
            for index, bucket in enumerate(buckets):
                path, buf = self._mapping(index, bucket["nbytes"])
                for entry in bucket["tensors"]:
                    tensor = state[entry[_NAME]]
                    buf[entry[_OFFSET]:entry[_OFFSET] + entry[_NBYTES]].copy_(flat_bytes(tensor))
                bucket["path"] = path
            for path, _, _ in self._maps[len(buckets):]:
                if os.path.exists(path):
                    os.unlink(path)
            del self._maps[len(buckets):]
        return {"transport": SHM, "buckets": buckets}

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
            with _READ_LOCK:  # this process's reader mappings of the same files
                for path in [p for p in _READ_MAPS if os.path.dirname(p) == self.directory]:
                    del _READ_MAPS[path]
            shutil.rmtree(self.directory, ignore_errors=True)
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None


_POOLS: dict[str, ShmBucketPool] = {}


def shm_pool(channel: str) -> ShmBucketPool:
    """The process-wide pool of ``channel`` (one per trainer -> inference pair)."""
    pool = _POOLS.get(channel)
    if pool is None:
        pool = _POOLS[channel] = ShmBucketPool(channel)
    return pool


@atexit.register
def close_pools() -> None:
    """Remove this process's bucket files (at exit, and before the engine kills its workers)."""
    forget_mappings()
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


# ---------------------------------------------------------------------------
# Ray object store (writer side)
# ---------------------------------------------------------------------------

def put_object_store(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> dict[str, Any]:
    """One Ray object per bucket: a list of per-tensor uint8 numpy arrays.

    numpy arrays are serialized out of band: ``ray.put`` copies each straight
    into the object store and a reader on the same node gets read-only views
    without a copy (torch tensors would be pickled: two more copies).
    """
    import ray

    buckets = plan_buckets(state, bucket_bytes)
    for bucket in buckets:
        arrays = [flat_bytes(state[e[_NAME]]).numpy() for e in bucket["tensors"]]
        bucket["ref"] = ray.put(arrays)
    return {"transport": OBJECT_STORE, "buckets": buckets}


# Writer-side GPU buckets per channel, alive until the receivers have loaded them:
# an IPC handle only maps memory that its producer still holds.
_IPC_BUFFERS: dict[str, list[torch.Tensor]] = {}


def gpu_uuid() -> str:
    """This process's current GPU ("" without one): who can open whose CUDA IPC handles."""
    if not torch.cuda.is_available():
        return ""
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def gpu_uuids() -> list[str]:
    """Every GPU this process sees (none without CUDA): a vLLM replica over several GPUs
    sees all of them, a trainer rank its one."""
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def put_cuda_ipc(state: dict[str, torch.Tensor], bucket_bytes: int, channel: str) -> dict[str, Any]:
    """Pack GPU tensors into GPU buckets and describe them by CUDA IPC handles.

    Tensors are taken out of ``state`` as they are packed, so the peak is one
    model plus one bucket, not two models.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    release_cuda_ipc(channel)
    plan = plan_buckets(state, bucket_bytes)
    device = next(iter(state.values())).device
    if device.type != "cuda":
        raise ValueError(f"the cuda_ipc weight sync needs GPU tensors, got them on {device}")
    kept = []
    for bucket in plan:
        buf = torch.empty(max(bucket["nbytes"], 1), dtype=torch.uint8, device=device)
        for entry in bucket["tensors"]:
            tensor = state.pop(entry[_NAME]).detach().contiguous()
            buf[entry[_OFFSET]:entry[_OFFSET] + entry[_NBYTES]].copy_(tensor.reshape(-1).view(torch.uint8))
        bucket["ipc"] = reduce_tensor(buf)
        kept.append(buf)
    torch.cuda.synchronize(device)  # every copy lands before a receiver reads
    _IPC_BUFFERS[channel] = kept
    return {"transport": CUDA_IPC, "gpu": gpu_uuid(), "buckets": plan}


def release_cuda_ipc(channel: str) -> None:
    """Free the writer's buckets of ``channel`` (once every receiver has loaded them)."""
    if _IPC_BUFFERS.pop(channel, None) is not None:
        torch.cuda.empty_cache()


def write_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int, transport: str,
                  channel: str = "default") -> dict[str, Any]:
    """Write ``state`` with ``transport`` (``"shm"``, ``"object_store"``, ``"cuda_ipc"``, or
    ``"auto"``: shm, falling back to the object store when /dev/shm is too small)."""
    if transport not in TRANSPORTS + ("auto",):
        raise ValueError(f"unknown weight-sync transport {transport!r}; expected one of {TRANSPORTS} or 'auto'")
    if transport == OBJECT_STORE:
        return put_object_store(state, bucket_bytes)
    if transport == COLLECTIVE:
        from chatlearn.synchronizer import collective

        plan = plan_buckets(state, bucket_bytes)
        collective.stage(channel, state, plan)  # sent by collective.send, once the receivers listen
        return {"transport": COLLECTIVE, "channel": channel, "buckets": plan}
    if transport == CUDA_IPC:
        # Hand the dict over (put_cuda_ipc empties it as it packs): one model in GPU memory, not two.
        return put_cuda_ipc(state if isinstance(state, dict) else dict(state), bucket_bytes, channel)
    try:
        return shm_pool(channel).write(state, bucket_bytes)
    except ShmSpaceError as err:
        if transport == SHM:
            raise
        warnings.warn(f"weight sync falls back to Ray's object store: {err}")
        return put_object_store(state, bucket_bytes)


# ---------------------------------------------------------------------------
# Reader side
# ---------------------------------------------------------------------------

# Reader-side mappings kept between syncs: path -> (inode, nbytes, uint8 mapping).
# The writer rewrites the same files, so a kept mapping sees the new bytes
# (MAP_SHARED: coherent by definition) without the page faults of mapping a
# file anew (~0.25 s per 1.6 GB on the 2-core test machine, measured in the
# benchmark as shm loads slower than object-store loads before this cache).
_READ_MAPS: dict[str, tuple[int, int, torch.Tensor]] = {}
_READ_LOCK = threading.Lock()


def _shm_buffer(path: str, nbytes: int) -> torch.Tensor:
    inode = os.stat(path).st_ino
    with _READ_LOCK:
        kept = _READ_MAPS.get(path)
        if kept is not None and kept[0] == inode and kept[1] == nbytes:
            return kept[2]
        # shared=True maps the existing file as it is (it is not resized when
        # large enough); the reader only reads.
        buf = torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)
        _READ_MAPS[path] = (inode, nbytes, buf)
        return buf


def _forget_other_mappings(manifest: Mapping[str, Any]) -> None:
    """Drop kept mappings of files this manifest no longer uses in the same directories
    (a mapping keeps an unlinked tmpfs file's memory alive)."""
    paths = {b["path"] for b in manifest["buckets"]}
    dirs = {os.path.dirname(p) for p in paths}
    with _READ_LOCK:
        for path in [p for p in _READ_MAPS if os.path.dirname(p) in dirs and p not in paths]:
            del _READ_MAPS[path]


def forget_mappings() -> None:
    with _READ_LOCK:
        _READ_MAPS.clear()


def _bucket_buffer(bucket: Mapping[str, Any], transport: str) -> Any:
    if transport == SHM:
        return _shm_buffer(bucket["path"], bucket["nbytes"])
    if transport == CUDA_IPC:
        rebuild, args = bucket["ipc"]
        return rebuild(*args)
    import ray

    return ray.get(bucket["ref"])


def iter_manifest(manifest: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor, one bucket mapped/fetched at a time.

    The tensors are read-only views of shared memory: valid while the caller
    holds them, overwritten by the next sync. Copy what must outlive the call.
    """
    transport = manifest["transport"]
    if transport == SHM:
        _forget_other_mappings(manifest)
    if transport == CUDA_IPC and manifest["gpu"] != gpu_uuid():
        raise RuntimeError(f"cuda_ipc weight sync: the buckets live on GPU {manifest['gpu']}, this process "
                           f"runs on {gpu_uuid() or 'no GPU'}")
    if transport == COLLECTIVE:
        from chatlearn.synchronizer import collective

        for bucket, buffer in collective.receive(manifest["channel"], manifest["buckets"]):
            for entry in bucket["tensors"]:
                yield entry[_NAME], _view(buffer, entry)
        return
    for bucket in manifest["buckets"]:
        buffer = _bucket_buffer(bucket, transport)
        for i, entry in enumerate(bucket["tensors"]):
            if transport in (SHM, CUDA_IPC):
                yield entry[_NAME], _view(buffer, entry)
            else:
                with warnings.catch_warnings():
                    # Object-store arrays are read-only; the loaders only read them.
                    warnings.simplefilter("ignore", UserWarning)
                    raw = torch.from_numpy(buffer[i])
                yield entry[_NAME], raw.view(dtype_from_name(entry[_DTYPE])).view(tuple(entry[_SHAPE]))
        del buffer


def materialize(manifest: Mapping[str, Any], copy: bool = True) -> dict[str, torch.Tensor]:
    """The whole state dict (copies by default: safe to keep)."""
    return {name: (t.clone() if copy else t) for name, t in iter_manifest(manifest)}


def spill_to_shm(manifest: Mapping[str, Any], channel: str, bucket_bytes: Optional[int] = None) -> dict[str, Any]:
    """Re-write an object-store manifest as shm files on this node (for vLLM
    worker processes, which cannot fetch Ray objects)."""
    if manifest["transport"] == SHM:
        return dict(manifest)
    biggest = max((b["nbytes"] for b in manifest["buckets"]), default=1)
    return shm_pool(channel).write(dict(iter_manifest(manifest)), bucket_bytes or biggest)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
