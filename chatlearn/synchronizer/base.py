"""Parameter sync: after training, the trainer's weights reach its inference model.

A synchronizer moves weights named in Hugging Face terms from a trainer
(``named_parameters_for_sync`` on its ranks) into every replica of an
inference model (``load_parameters_from_sync``), with no restart. This module
holds the interface, the bucketed full-state-dict synchronizer used by default
(any trainer -> any receiver: Megatron or plain PyTorch into vLLM, Megatron or
PyTorch models), and the checksum validation behind
``runtime.validate_param_sync``. Other transports plug in by subclassing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from chatlearn.synchronizer import buckets

if TYPE_CHECKING:
    from chatlearn.runtime.dist_model import DistModel


class ParamSyncError(RuntimeError):
    pass


class ParameterSynchronizer:
    """Moves weights from ``src`` (trainer) to ``dst`` (inference model)."""

    def sync(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        raise NotImplementedError

    def validate(self, src: "DistModel", dst: "DistModel") -> None:
        """Compare per-parameter checksums of both sides; raise naming the first mismatch."""
        expected = src.call_output_ranks("parameter_checksums")[0]
        for replica_id, got in enumerate(dst.call_output_ranks("parameter_checksums")):
            if "lm_head.weight" in got and "lm_head.weight" not in expected and "model.embed_tokens.weight" in expected:
                # A trainer that sends no LM head is tied (else the receiver refuses the
                # sync as incomplete): the receiver's head must equal the embedding.
                expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
            missing = sorted(set(expected) - set(got))
            if missing:
                raise ParamSyncError(
                    f"param sync {src.name} -> {dst.name}: replica {replica_id} lacks {missing[0]}"
                    f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
                )
            for name, value in expected.items():
                if not _close(value, got[name]):
                    raise ParamSyncError(
                        f"param sync {src.name} -> {dst.name}: parameter {name} differs on replica "
                        f"{replica_id} (trainer checksum {value}, inference checksum {got[name]})"
                    )


class StateDictSynchronizer(ParameterSynchronizer):
    """The trainer's full HF state dict, in buckets, into every replica at once.

    Every trainer rank takes part in the export (a sharded trainer gathers
    collectively: any training TP/PP layout gives the same complete HF state
    dict, which is what lets any inference layout load it); the first output
    rank writes the buckets (``runtime.coalesced_buffer_mb`` each, see
    ``chatlearn.synchronizer.buckets``) and every rank of every inference
    replica loads them concurrently. Transport: ``"shm"`` (/dev/shm files on
    the trainer's node), ``"object_store"`` (Ray), ``"cuda_ipc"`` (GPU buffers
    of a trainer rank on the receiver's own GPU), or ``"auto"``: cuda_ipc when
    every receiver shares a GPU with a trainer rank, else shm when the writer
    and all receivers share a node, else the object store.
    """

    def __init__(self, bucket_mb: Optional[float] = None, transport: str = "auto"):
        if transport not in buckets.TRANSPORTS + ("auto",):
            raise ValueError(f"unknown weight-sync transport {transport!r}; "
                             f"expected one of {buckets.TRANSPORTS} or 'auto'")
        if bucket_mb is not None and bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.bucket_mb = bucket_mb
        self.transport = transport
        self._resolved: dict[tuple[str, str], tuple[str, list[int]]] = {}

    def bucket_bytes(self) -> int:
        mb = self.bucket_mb
        if mb is None:
            from chatlearn.config.globals import get_args

            mb = get_args().runtime.coalesced_buffer_mb
        return max(1, int(float(mb) * 2**20))

    def _plan(self, src: "DistModel", dst: "DistModel") -> tuple[str, list[int]]:
        """The transport, and for each receiver (``dst.workers`` order) the index in
        ``src.workers`` of the trainer rank whose buckets it reads."""
        key = (src.name, dst.name)
        if key in self._resolved:
            return self._resolved[key]
        output_rank = next(i for i, w in enumerate(src.workers) if w.is_output_rank)
        transport, sources = self.transport, [output_rank] * len(dst.workers)
        if self.transport in ("auto", buckets.CUDA_IPC):
            workers = [*src.workers, *dst.workers]
            found = src.tracker.get([w.actor.address.remote() for w in workers] +
                                    [src.run_on_worker(w, "gpu_uuid", _gpu_uuid) for w in workers])
            hosts, gpus = found[:len(workers)], found[len(workers):]
            src_gpus, dst_gpus = gpus[:len(src.workers)], gpus[len(src.workers):]
            # Every trainer rank holds the whole exported model: each receiver reads
            # from a trainer rank on its own GPU, device to device.
            shared = all(g and g in src_gpus for g in dst_gpus) and len({h for h, _ in hosts}) == 1
            if shared:
                transport, sources = buckets.CUDA_IPC, [src_gpus.index(g) for g in dst_gpus]
            elif self.transport == buckets.CUDA_IPC:
                raise ValueError(f"param sync {src.name} -> {dst.name}: transport cuda_ipc needs every "
                                 f"receiver on a GPU that a trainer rank uses (trainer GPUs {src_gpus}, "
                                 f"receiver GPUs {dst_gpus})")
            else:
                # "auto" at the writer: shm, or the object store if /dev/shm is too small.
                transport = "auto" if len({h for h, _ in hosts}) == 1 else buckets.OBJECT_STORE
        self._resolved[key] = (transport, sources)
        return self._resolved[key]

    def sync(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        start = time.perf_counter()
        transport, sources = self._plan(src, dst)
        writers = set(sources)
        channel = f"{src.name}-to-{dst.name}"
        refs = [src.run_on_worker(w, "param_sync_export", _export, self.bucket_bytes(), transport, channel,
                                  i in writers) for i, w in enumerate(src.workers)]
        exported = src.tracker.get(refs)
        manifest, export_stats = exported[sources[0]]
        exported_at = time.perf_counter()
        # All replicas (and all ranks of each) at once.
        loads = dst.tracker.get([dst.run_on_worker(w, "param_sync_load", _load, exported[sources[i]][0])
                                 for i, w in enumerate(dst.workers)])
        if transport == buckets.CUDA_IPC:
            src.tracker.get([src.run_on_worker(src.workers[i], "param_sync_release", _release, channel)
                             for i in writers])
        end = time.perf_counter()
        sizes = [b["nbytes"] for b in manifest["buckets"]]
        nbytes = float(buckets.manifest_nbytes(manifest))
        stats = {
            "seconds": end - start,
            "bytes": nbytes,
            "gb_per_s": nbytes / max(end - start, 1e-9) / 1e9,
            "num_buckets": float(len(sizes)),
            "max_bucket_bytes": float(max(sizes, default=0)),
            "transport_shm": float(manifest["transport"] == buckets.SHM),
            "transport_cuda_ipc": float(manifest["transport"] == buckets.CUDA_IPC),
            "export_s": export_stats["export_s"],
            "write_s": export_stats["write_s"],
            "export_total_s": exported_at - start,
            "load_total_s": end - exported_at,
            "replicas": float(dst.num_replicas),
        }
        for key in ("load_s", "reset_s", "spill_s", "update_s"):
            values = [r[key] for r in loads if r and key in r]
            if values:
                stats[key] = max(values)  # replicas load concurrently: the slowest one counts
        return stats


def _export(module, bucket_bytes: int, transport: str, channel: str, is_writer: bool):
    """Trainer side (in each trainer rank): export, and on the writer ranks write buckets."""
    if transport == buckets.CUDA_IPC:
        state, export_s = buckets.timed(module.named_parameters_for_sync, device="cuda")
    else:
        state, export_s = buckets.timed(module.named_parameters_for_sync)
    if not is_writer:
        return None
    # (cuda_ipc consumes ``state`` while packing it.)
    manifest, write_s = buckets.timed(buckets.write_buckets, state, bucket_bytes, transport, channel)
    return manifest, {"export_s": export_s, "write_s": write_s}


def _release(module, channel: str) -> None:
    buckets.release_cuda_ipc(channel)


def _gpu_uuid(module) -> str:
    return buckets.gpu_uuid()


def _load(module, manifest: dict):
    """Inference side (in each rank of each replica)."""
    loader = getattr(module, "load_parameters_from_buckets", None)
    if loader is not None:
        return loader(manifest)
    start = time.perf_counter()
    # Copies: a module may keep the tensors it is given, and the shared-memory
    # views are rewritten by the next sync.
    module.load_parameters_from_sync(buckets.materialize(manifest, copy=True))
    return {"load_s": time.perf_counter() - start}


def _close(a: tuple[float, float], b: tuple[float, float], rtol: float = 1e-5) -> bool:
    return all(abs(x - y) <= rtol * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))
