"""A checkpoint saved by the megatron backend under TP2xPP2 (after training) serves in vLLM."""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.utils.tiny_assets import ensure_tiny_assets
from chatlearn.utils.launch import spawn
from tests.test_megatron_module import _data, _module


def _save_worker(rank: int, world: int, model_dir: str, out: str) -> None:
    module = _module(model_dir, 2, 2, trainable=True, optimizer="sgd", lr=0.05, clip_grad=0.0)
    module.train_step(_data(1), 0)
    module.save_hf_checkpoint(out)


def test_saved_checkpoint_generates_in_vllm_like_transformers(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    model_dir = str(ensure_tiny_assets(root, seed=1, arch="qwen2").model_dir)
    out = str(tmp_path / "saved")
    spawn(_save_worker, 4, model_dir, out)

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm_cache"))
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    threads = torch.get_num_threads()
    llm = LLM(out, dtype="float32", enforce_eager=True, seed=0)
    prompt = [1, 20, 30, 40, 50, 60]
    result = llm.generate([{"prompt_token_ids": prompt}],
                          SamplingParams(max_tokens=6, temperature=0, logprobs=0))[0].outputs[0]
    del llm
    torch.set_num_threads(threads)
    vllm_logprobs = [next(iter(d.values())).logprob for d in result.logprobs]

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
    assert list(result.token_ids) == greedy.tolist()
    ids = torch.tensor([prompt + list(result.token_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1:-1], -1)
    expected = logp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
    assert max(abs(a - b) for a, b in zip(vllm_logprobs, expected.tolist())) < 1e-4
