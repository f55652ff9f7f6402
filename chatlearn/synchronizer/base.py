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
    the trainer's node), ``"object_store"`` (Ray), or ``"auto"``: shm when
    the writer and all receivers share a node, else the object store.
    """

    def __init__(self, bucket_mb: Optional[float] = None, transport: str = "auto"):
        if transport not in buckets.TRANSPORTS + ("auto",):
            raise ValueError(f"unknown weight-sync transport {transport!r}; "
                             f"expected one of {buckets.TRANSPORTS} or 'auto'")
        if bucket_mb is not None and bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.bucket_mb = bucket_mb
        self.transport = transport
        self._resolved: dict[tuple[str, str], str] = {}

    def bucket_bytes(self) -> int:
        mb = self.bucket_mb
        if mb is None:
            from chatlearn.config.globals import get_args

            mb = get_args().runtime.coalesced_buffer_mb
        return max(1, int(float(mb) * 2**20))

    def _resolve_transport(self, src: "DistModel", writer, dst: "DistModel") -> str:
        if self.transport != "auto":
            return self.transport
        key = (src.name, dst.name)
        if key not in self._resolved:
            refs = [w.actor.address.remote() for w in [writer, *dst.workers]]
            hosts = {addr for addr, _ in src.tracker.get(refs)}
            # "auto" at the writer: shm, or the object store if /dev/shm is too small.
            self._resolved[key] = "auto" if len(hosts) == 1 else buckets.OBJECT_STORE
        return self._resolved[key]

    def sync(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        start = time.perf_counter()
        writer = next(w for w in src.workers if w.is_output_rank)
        transport = self._resolve_transport(src, writer, dst)
        channel = f"{src.name}-to-{dst.name}"
        refs = [src.run_on_worker(w, "param_sync_export", _export, self.bucket_bytes(), transport, channel,
                                  w is writer) for w in src.workers]
        exported = src.tracker.get(refs)
        manifest, export_stats = next(r for r, w in zip(exported, src.workers) if w is writer)
        exported_at = time.perf_counter()
        # All replicas (and all ranks of each) at once.
        loads = dst.tracker.get([dst.run_on_worker(w, "param_sync_load", _load, manifest) for w in dst.workers])
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
    """Trainer side (in each trainer rank): export, and on the writer rank write buckets."""
    state, export_s = buckets.timed(module.named_parameters_for_sync)
    if not is_writer:
        return None
    manifest, write_s = buckets.timed(buckets.write_buckets, state, bucket_bytes, transport, channel)
    return manifest, {"export_s": export_s, "write_s": write_s}


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
