"""Parameter sync: after training, the trainer's weights reach its inference model.

A synchronizer moves weights named in Hugging Face terms from a trainer
(``named_parameters_for_sync`` on its ranks) into every replica of an
inference model (``load_parameters_from_sync``), with no restart. This module
holds the interface, the bucketed full-state-dict synchronizer used by default
(any trainer -> any receiver: Megatron or plain PyTorch into vLLM, Megatron or
PyTorch models), and the validation behind ``runtime.validate_param_sync``.
Other transports plug in by subclassing.

Validation has two parts (``ParameterSynchronizer.validate``):

1. Position-sensitive checksums per parameter (``checksums.py``): catch
   what went wrong in transit, naming the parameter and the replica, even
   when the values only moved (permuted rows, swapped heads, a transpose).
2. A probe: the same fixed token batch through both models after the
   checksums agreed; the log-probs (values, for a reward/value pair) must
   agree. Both sides' checksums are computed through the same name and
   layout tables they are meant to check (the trainer's export to HF names,
   vLLM's loading and un-fusing of those names), so a wrong table (say, a
   wrong q/k/v interleave in the Megatron -> HF export) is exported, loaded
   and read back consistently: only running the models shows it.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from chatlearn.synchronizer import buckets
from chatlearn.synchronizer import checksums as records

if TYPE_CHECKING:
    from chatlearn.runtime.dist_model import DistModel


logger = logging.getLogger(__name__)

FP32_PROBE_ATOL = 1e-4
BF16_PROBE_ATOL = 1.0


class ParamSyncError(RuntimeError):
    pass


class ParameterSynchronizer:
    """Moves weights from ``src`` (trainer) to ``dst`` (inference model).

    Probe settings (class defaults; ``StateDictSynchronizer`` takes them as
    arguments): ``probe`` turns the probe off; ``probe_batch`` x
    ``probe_length`` deterministic tokens (``probe_seed``) below the smaller
    vocabulary of the two sides; ``probe_atol_fp32`` bounds the largest
    absolute log-prob (or value) gap over the probe tokens when both sides
    hold float32 (or float64) weights; ``probe_atol_bf16`` when either holds
    bfloat16 or float16.

    Why 1e-4 and 1.0. In float32 the implementations (Megatron, transformers,
    vLLM) agreed within 1e-6 to 2e-5 on the tiny models and within 1e-4 up to
    380M parameters (PLATFORM.md), while a wrong q/k/v interleave in the
    export moved the tiny models' log-probs by 0.67-0.79
    (tests/test_param_sync_validation.py). In bf16 every layer rounds its
    activations to 8 bits of mantissa, differently in each implementation: on
    the probe's random (improbable, log p ~ -18) tokens, bf16 against float32
    compute with the same weights differed by at most 0.18-0.21 (mean 0.045)
    on Llama shapes of 8-12 layers with logits scaled like a trained model's
    (measured on CPU with transformers), and a wrong q head order in the same
    models by 9.7-11.5 (mean 2.3-2.9). Two bf16 implementations may differ by
    about the sum of their errors, and deeper models accumulate more: 1.0
    leaves that headroom and stays ~10x below the layout error. What it
    cannot see in bf16: a tiny random model's layout error (under 1); validate
    those in float32.
    """

    probe: bool = True
    probe_batch: int = 4
    probe_length: int = 32
    probe_seed: int = 1234
    probe_atol_fp32: float = FP32_PROBE_ATOL
    probe_atol_bf16: float = BF16_PROBE_ATOL

    def sync(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        raise NotImplementedError

    def validate(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        """Checksums, then the probe; raise ``ParamSyncError`` naming the first mismatch.

        Returns seconds spent (``checksum_s``, ``probe_s``) and the probe's
        largest gap (``probe_max_gap``) when it ran.
        """
        start = time.perf_counter()
        expected = src.call_output_ranks("parameter_checksums")[0]
        got = dst.call_output_ranks("parameter_checksums")
        check_checksums(src.name, dst.name, expected, got)
        stats = {"checksum_s": time.perf_counter() - start}
        if self.probe:
            roundoffs = [float(r[records.UNIT_ROUNDOFF]) for side in (expected, *got) for r in side.values()
                         if len(r) > records.UNIT_ROUNDOFF]
            stats.update(self.run_probe(src, dst, max(roundoffs, default=records.unit_roundoff_fp32())))
        return stats

    # -- the probe -------------------------------------------------------------------
    def probe_bound(self, unit_roundoff: float) -> tuple[float, str]:
        """The gap allowed for weights of this precision (the coarsest of both sides), and its name."""
        precision = records.dtype_of_roundoff(unit_roundoff)
        if unit_roundoff <= records.unit_roundoff_fp32():
            return float(self.probe_atol_fp32), precision
        return float(self.probe_atol_bf16), precision

    def _skip_probe(self, src: "DistModel", dst: "DistModel", why: str) -> dict[str, float]:
        skipped = self.__dict__.setdefault("_probe_skipped", set())
        if (src.name, dst.name) not in skipped:
            skipped.add((src.name, dst.name))
            logger.warning("param sync %s -> %s: no probe (%s); only checksums validate this pair",
                           src.name, dst.name, why)
        return {}

    def probe_tokens(self, src: "DistModel", dst: "DistModel") -> Optional[list[list[int]]]:
        """The pair's probe batch (cached): deterministic ids below both sides' vocabulary sizes."""
        cache = self.__dict__.setdefault("_probe_token_cache", {})
        key = (src.name, dst.name)
        if key not in cache:
            sizes = [src.call_output_ranks("probe_vocab_size")[0], *dst.call_output_ranks("probe_vocab_size")]
            cache[key] = None if any(v is None for v in sizes) else make_probe_tokens(
                min(int(v) for v in sizes), self.probe_batch, self.probe_length, self.probe_seed)
        return cache[key]

    def run_probe(self, src: "DistModel", dst: "DistModel", unit_roundoff: float) -> dict[str, float]:
        """Fixed tokens through both models; every replica's outputs within the bound of the trainer's."""
        missing = [side.name for side in (src, dst) if not can_probe(side)]
        if missing:
            return self._skip_probe(src, dst, f"{' and '.join(missing)} has no probe_outputs")
        start = time.perf_counter()
        tokens = self.probe_tokens(src, dst)
        if tokens is None:
            return self._skip_probe(src, dst, "a side reports no vocabulary size")
        want = src.call_output_ranks("probe_outputs", tokens)[0]
        outputs = dst.call_output_ranks("probe_outputs", tokens)
        if want is None or any(o is None for o in outputs):
            return self._skip_probe(src, dst, "a side returned no probe outputs (not a causal LM or score model)")
        bound, precision = self.probe_bound(unit_roundoff)
        largest = 0.0
        for replica_id, got in enumerate(outputs):
            if tuple(got.shape) != tuple(want.shape):
                raise ParamSyncError(
                    f"param sync {src.name} -> {dst.name}: probe outputs of replica {replica_id} have shape "
                    f"{tuple(got.shape)}, the trainer's {tuple(want.shape)} (one side scores log-probs, the "
                    f"other values?)")
            gap = float((got.double() - want.double()).abs().max())
            if not gap <= bound:  # NaN fails too
                raise ParamSyncError(
                    f"param sync {src.name} -> {dst.name}: the probe's outputs on replica {replica_id} differ "
                    f"from the trainer's by up to {gap:.4g} (bound {bound:g} for {precision} weights, "
                    f"{want.shape[0]} sequences of {want.shape[1]} tokens) although every parameter checksum "
                    f"agreed: the weights arrived as sent, so a layout table is wrong (the trainer's export "
                    f"to Hugging Face names, e.g. a q/k/v or gate/up interleave, or the receiver's loading of "
                    f"those names)")
            largest = max(largest, gap)
        return {"probe_s": time.perf_counter() - start, "probe_max_gap": largest}


def choose_transport(wanted: str, one_host: bool, output_rank: int, src_gpus: list[list[str]],
                     dst_gpus: list[list[str]], pair: str) -> tuple[str, list[int]]:
    """The transport for ``wanted``, and the trainer rank each receiver reads from.

    ``src_gpus`` / ``dst_gpus``: the GPUs each trainer rank / receiving actor sees (a vLLM
    replica over several GPUs lists them all; [] off GPU). ``auto`` picks, in order:

    * ``cuda_ipc``: every receiver is one process on a GPU that a trainer rank uses (same
      host); it reads that rank's buffers device to device (every trainer rank holds the
      whole exported model);
    * ``collective``: the writer and every receiver are on GPUs, no two on one GPU (NCCL
      refuses a group with two members on one device): a broadcast over NVLink or the network;
    * ``auto`` at the writer: /dev/shm on one host (or the object store if it is too small);
    * ``object_store`` across hosts.
    """
    sources = [output_rank] * len(dst_gpus)
    trainer_gpus = [g[0] if len(g) == 1 else "" for g in src_gpus]
    if wanted in ("auto", buckets.CUDA_IPC):
        if one_host and dst_gpus and all(len(g) == 1 and g[0] in trainer_gpus for g in dst_gpus):
            return buckets.CUDA_IPC, [trainer_gpus.index(g[0]) for g in dst_gpus]
        if wanted == buckets.CUDA_IPC:
            raise ValueError(f"{pair}: transport cuda_ipc needs every receiver to be one process on a GPU that "
                             f"a trainer rank uses (trainer GPUs {src_gpus}, receiver GPUs {dst_gpus})")
    members = [*src_gpus[output_rank], *(g for gpus in dst_gpus for g in gpus)]
    on_gpus = bool(src_gpus[output_rank]) and all(dst_gpus)
    distinct = len(set(members)) == len(members)
    if wanted == buckets.COLLECTIVE and on_gpus and not distinct:
        raise ValueError(f"{pair}: transport collective (NCCL) cannot have two members on one GPU: the writing "
                         f"trainer rank sees {src_gpus[output_rank]}, the receivers {dst_gpus}. Use 'auto' "
                         f"(CUDA IPC or /dev/shm for receivers on the trainer's GPUs)")
    if wanted == "auto":
        if on_gpus and distinct:
            return buckets.COLLECTIVE, sources
        return ("auto" if one_host else buckets.OBJECT_STORE), sources
    return wanted, sources


def can_probe(side: Any) -> bool:
    """Whether a model (a DistModel, or anything with the driver-side ``module``) has the probe methods."""
    module = getattr(side, "module", None)
    return module is not None and all(callable(getattr(type(module), m, None))
                                      for m in ("probe_outputs", "probe_vocab_size"))


def make_probe_tokens(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """``batch`` sequences of ``length`` token ids in ``[0, vocab_size)``, the same on every machine."""
    import torch

    if vocab_size <= 0:
        raise ValueError(f"probe: vocabulary size must be positive, got {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).tolist()


def check_checksums(src_name: str, dst_name: str, expected: dict, got_per_replica: list[dict]) -> None:
    """Raise ``ParamSyncError`` at the first parameter whose records differ (``checksums.mismatch``)."""
    for replica_id, got in enumerate(got_per_replica):
        if "lm_head.weight" in got and "lm_head.weight" not in expected and "model.embed_tokens.weight" in expected:
            # A trainer that sends no LM head is tied (else the receiver refuses the
            # sync as incomplete): the receiver's head must equal the embedding.
            expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
        missing = sorted(set(expected) - set(got))
        if missing:
            raise ParamSyncError(
                f"param sync {src_name} -> {dst_name}: replica {replica_id} lacks {missing[0]}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
            )
        for name, value in expected.items():
            why = records.mismatch(value, got[name])
            if why is not None:
                raise ParamSyncError(
                    f"param sync {src_name} -> {dst_name}: parameter {name} differs on replica "
                    f"{replica_id}: {why} (trainer checksum {records.format_record(value)}, inference "
                    f"checksum {records.format_record(got[name])}; sum, sum |x|, position-weighted sums)"
                )


class StateDictSynchronizer(ParameterSynchronizer):
    """The trainer's full HF state dict, in buckets, into every replica at once.

    Every trainer rank of a data-parallel group that writes takes part in the
    export (a sharded trainer gathers collectively over TP and PP: any training
    layout gives the same complete HF state dict, which is what lets any
    inference layout load it; the other DP groups skip it); the first output
    rank writes the buckets (``runtime.coalesced_buffer_mb`` each, see
    ``chatlearn.synchronizer.buckets``) and every rank of every inference
    replica loads them concurrently. Transport: ``"shm"`` (/dev/shm files on
    the trainer's node), ``"object_store"`` (Ray), ``"cuda_ipc"`` (GPU buffers
    of a trainer rank on the receiver's own GPU), ``"collective"`` (a
    broadcast over a process group of the writer and every receiving process,
    made for the pair at the first sync: gloo on CPU, NCCL on GPU), or
    ``"auto"``: cuda_ipc when every receiver shares a GPU with a trainer rank,
    else shm when the writer and all receivers share a node, else the object
    store. None (the default): ``runtime.param_sync_transport``.
    """

    def __init__(self, bucket_mb: Optional[float] = None, transport: Optional[str] = None, probe: bool = True,
                 probe_atol_fp32: float = FP32_PROBE_ATOL, probe_atol_bf16: float = BF16_PROBE_ATOL,
                 in_transit: Optional[Callable[[dict], dict]] = None):
        """``probe*``: see :class:`ParameterSynchronizer`. ``in_transit``: fault injection
        for tests, a picklable function that the trainer's writer ranks apply to the
        exported state dict before writing it (what vLLM then loads; the trainer's own
        checksums still describe its real weights)."""
        if transport is not None and transport not in buckets.TRANSPORTS + ("auto",):
            raise ValueError(f"unknown weight-sync transport {transport!r}; "
                             f"expected one of {buckets.TRANSPORTS} or 'auto'")
        if bucket_mb is not None and bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        if probe_atol_fp32 <= 0 or probe_atol_bf16 <= 0:
            raise ValueError(f"probe bounds must be positive, got {probe_atol_fp32} and {probe_atol_bf16}")
        self.bucket_mb = bucket_mb
        self.transport = transport
        self.probe = probe
        self.probe_atol_fp32 = float(probe_atol_fp32)
        self.probe_atol_bf16 = float(probe_atol_bf16)
        self.in_transit = in_transit
        self._resolved: dict[tuple[str, str], tuple[str, list[int]]] = {}
        self._joined: set[tuple[str, str]] = set()  # pairs whose collective group exists

    def bucket_bytes(self) -> int:
        mb = self.bucket_mb
        if mb is None:
            from chatlearn.config.globals import get_args

            mb = get_args().runtime.coalesced_buffer_mb
        return max(1, int(float(mb) * 2**20))

    def _transport(self) -> str:
        if self.transport is not None:
            return self.transport
        from chatlearn.config.globals import get_args

        return get_args().runtime.param_sync_transport

    def _plan(self, src: "DistModel", dst: "DistModel") -> tuple[str, list[int]]:
        """The transport, and for each receiver (``dst.workers`` order) the index in
        ``src.workers`` of the trainer rank whose buckets it reads (``choose_transport``)."""
        key = (src.name, dst.name)
        if key not in self._resolved:
            workers = [*src.workers, *dst.workers]
            found = src.tracker.get([w.actor.node_ip.remote() for w in workers] +
                                    [src.run_on_worker(w, "gpu_uuids", _gpu_uuids) for w in workers])
            hosts, gpus = found[:len(workers)], found[len(workers):]
            output_rank = next(i for i, w in enumerate(src.workers) if w.is_output_rank)
            self._resolved[key] = choose_transport(self._transport(), len(set(hosts)) == 1, output_rank,
                                                   gpus[:len(src.workers)], gpus[len(src.workers):],
                                                   f"param sync {src.name} -> {dst.name}")
        return self._resolved[key]

    def sync(self, src: "DistModel", dst: "DistModel") -> dict[str, float]:
        start = time.perf_counter()
        transport, sources = self._plan(src, dst)
        writers = set(sources)
        channel = f"{src.name}-to-{dst.name}"
        if transport == buckets.COLLECTIVE and (src.name, dst.name) not in self._joined:
            self._join_group(src, dst, channel, sources[0])
        # The export gathers over tensor and pipeline parallelism only: a data-parallel
        # group with no writer in it has nothing to do (each parameter is gathered once
        # per writing group, not by every DP rank).
        writing_groups = {src.workers[i].dp_rank for i in writers}
        exporters = [i for i, w in enumerate(src.workers) if w.dp_rank in writing_groups]
        refs = [src.run_on_worker(src.workers[i], "param_sync_export", _export, self.bucket_bytes(), transport,
                                  channel, i in writers, self.in_transit) for i in exporters]
        exported = dict(zip(exporters, src.tracker.get(refs)))
        manifest, export_stats = exported[sources[0]]
        exported_at = time.perf_counter()
        # All replicas (and all ranks of each) at once; a collective sync's writer sends meanwhile.
        sends = [src.run_on_worker(src.workers[sources[0]], "param_sync_send", _send, channel)] \
            if transport == buckets.COLLECTIVE else []
        done = dst.tracker.get(sends + [dst.run_on_worker(w, "param_sync_load", _load, exported[sources[i]][0])
                                        for i, w in enumerate(dst.workers)])
        loads = done[len(sends):]
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
            "transport_collective": float(manifest["transport"] == buckets.COLLECTIVE),
            "export_s": export_stats["export_s"],
            "write_s": export_stats["write_s"],
            "export_total_s": exported_at - start,
            "load_total_s": end - exported_at,
            "replicas": float(dst.num_replicas),
        }
        if sends:
            stats["send_s"] = done[0]["send_s"]
        for key in ("load_s", "reset_s", "spill_s", "update_s"):
            values = [r[key] for r in loads if r and key in r]
            if values:
                stats[key] = max(values)  # replicas load concurrently: the slowest one counts
        return stats


    def _join_group(self, src: "DistModel", dst: "DistModel", channel: str, writer: int) -> None:
        """Form the pair's group: the writer (rank 0, hosting the rendezvous) and every receiving
        process (a vLLM replica contributes one per worker process), all joining at once."""
        import secrets

        start = time.perf_counter()
        secret = secrets.token_hex(16)
        host, port = src.tracker.get([src.run_on_worker(src.workers[writer], "sync_address", _address)])[0]
        sizes = dst.tracker.get([dst.run_on_worker(w, "sync_group_members", _group_members) for w in dst.workers])
        world = 1 + sum(sizes)
        refs = [src.run_on_worker(src.workers[writer], "sync_join", _join, channel, host, port, 0, world, secret)]
        offset = 1
        for w, size in zip(dst.workers, sizes):
            refs.append(dst.run_on_worker(w, "sync_join", _join, channel, host, port, offset, world, secret))
            offset += size
        src.tracker.get(refs)
        self._joined.add((src.name, dst.name))
        logger.info("param sync %s -> %s: collective group of %d processes (rendezvous %s:%d) formed in %.1f s",
                    src.name, dst.name, world, host, port, time.perf_counter() - start)


def _address(module) -> tuple[str, int]:
    import ray

    from chatlearn.synchronizer import collective

    return ray.util.get_node_ip_address(), collective.free_port()


def _group_members(module) -> int:
    """How many processes of this receiver take part in a collective sync (vLLM: its workers)."""
    members = getattr(module, "weight_group_members", None)
    return int(members()) if members is not None else 1


def _join(module, channel: str, host: str, port: int, rank: int, world: int, secret: str) -> None:
    join = getattr(module, "join_weight_group", None)
    if join is not None and rank > 0:
        join(channel, host, port, rank, world, secret)
    else:
        from chatlearn.synchronizer import collective

        collective.join(channel, host, port, rank, world, secret)


def _send(module, channel: str) -> dict[str, float]:
    from chatlearn.synchronizer import collective

    return collective.send(channel)


def _export(module, bucket_bytes: int, transport: str, channel: str, is_writer: bool,
            in_transit: Optional[Callable[[dict], dict]] = None):
    """Trainer side (in each trainer rank): export, and on the writer ranks write buckets."""
    if transport == buckets.CUDA_IPC or (transport == buckets.COLLECTIVE and torch.cuda.is_available()):
        state, export_s = buckets.timed(module.named_parameters_for_sync, device="cuda")
    else:
        state, export_s = buckets.timed(module.named_parameters_for_sync)
    if not is_writer:
        return None
    if in_transit is not None:
        state = in_transit(dict(state))
    # (cuda_ipc consumes ``state`` while packing it.)
    manifest, write_s = buckets.timed(buckets.write_buckets, state, bucket_bytes, transport, channel)
    return manifest, {"export_s": export_s, "write_s": write_s}


def _release(module, channel: str) -> None:
    buckets.release_cuda_ipc(channel)


def _gpu_uuids(module) -> list[str]:
    return buckets.gpu_uuids()


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


def _close(a, b) -> bool:
    """Whether two checksum records agree (``checksums.mismatch``; old two-number records too)."""
    return records.close(a, b)
