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
