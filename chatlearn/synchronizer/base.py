"""Parameter sync: after training, the trainer's weights reach its inference model.

A synchronizer moves weights named in Hugging Face terms from a trainer
(``named_parameters_for_sync`` on its ranks) into every replica of an
inference model (``load_parameters_from_sync``), with no restart. This module
holds the interface, the plain full-state-dict transport used by plain-PyTorch
models, and the checksum validation behind ``runtime.validate_param_sync``.
Resharding transports for Megatron -> vLLM plug in by subclassing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

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
    """Full weights through Ray's object store: one copy from the trainer's
    first output rank, read by every rank of every inference replica."""

    def sync(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        start = time.perf_counter()
        # Every trainer rank takes part (a sharded trainer gathers collectively);
        # the first output rank's copy is the one sent.
        refs = src.all_ranks("named_parameters_for_sync")
        first_output = next(r for r, w in zip(refs, src.workers) if w.is_output_rank)
        src.tracker.get(refs)
        nbytes = dst.tracker.get(dst.all_ranks("load_parameters_from_sync", first_output))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": float(sum(b or 0 for b in nbytes))}


def _close(a: tuple[float, float], b: tuple[float, float], rtol: float = 1e-5) -> bool:
    return all(abs(x - y) <= rtol * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))
