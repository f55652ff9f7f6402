"""The cuda_ipc weight-sync transport: GPU buckets read by another process on the same GPU.

Needs a CUDA device (skipped on CPU, so in CI); the GPU benchmark
(benchmarks/param_sync.py --device gpu) runs it inside the engine.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reader(manifest, expected, out):
    from chatlearn.synchronizer import buckets

    got = {name: t.to("cpu").clone() for name, t in buckets.iter_manifest(manifest)}
    out.put(all(torch.equal(got[k], v) for k, v in expected.items()) and set(got) == set(expected))


def test_cuda_ipc_buckets_reach_another_process_device_to_device():
    import torch.multiprocessing as mp

    from chatlearn.synchronizer import buckets

    gen = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.w": torch.randn(300, 70, generator=gen).to(torch.bfloat16) for i in range(5)}
    state["model.norm.weight"] = torch.randn(70, generator=gen)
    expected = {k: v.clone() for k, v in state.items()}
    manifest = buckets.write_buckets({k: v.cuda() for k, v in state.items()}, 100_000, buckets.CUDA_IPC, "test")
    assert manifest["transport"] == buckets.CUDA_IPC and len(manifest["buckets"]) > 1
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_reader, args=(manifest, expected, out))
    proc.start()
    assert out.get(timeout=120) is True
    proc.join(timeout=60)
    buckets.release_cuda_ipc("test")
    assert "test" not in buckets._IPC_BUFFERS


@pytest.mark.parametrize("weight_loader", ["load_weights", "reload_weights"])
def test_vllm_takes_a_sync_with_either_loader_on_gpu(tmp_path_factory, weight_loader):
    """The GPU default (``load_weights``, in place) and ``reload_weights`` both leave the
    engine computing with exactly the weights sent (checksums of what it holds)."""
    import os

    from safetensors.torch import load_file

    from chatlearn.models.vllm_module import VLLMModule
    from chatlearn.synchronizer import vllm_sync
    from chatlearn.synchronizer.base import _close
    from chatlearn.utils.tiny_assets import ensure_tiny_assets

    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    start_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    other = load_file(os.path.join(ensure_tiny_assets(root, seed=4, arch="qwen2").model_dir, "model.safetensors"))
    module = VLLMModule("policy", {"load": start_dir, "gpu_memory_utilization": 0.2, "max_model_len": 128,
                                   "weight_loader": weight_loader,
                                   "attention_backend": os.environ.get("vllm_attention_backend")})
    module.setup()
    try:
        before = module.parameter_checksums()
        module.load_parameters_from_sync(other)
        after = module.parameter_checksums()
        dtype = module.llm.llm_engine.model_config.dtype
        expected = vllm_sync.checksums({k: v.to(dtype) for k, v in other.items()})
        assert set(after) == set(expected)
        mismatched = [k for k in after if not _close(after[k], expected[k])]
        assert not mismatched, mismatched[:5]
        assert any(not _close(before[k], after[k]) for k in after)  # the weights did change
    finally:
        module.shutdown()
