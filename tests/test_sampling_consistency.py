"""The log-probs the trainer scores tokens with are those of the distribution vLLM sampled from.

Real vLLM (in-process, fp32 CPU) samples at temperature 0.5 with top-p 0.8 and
logs its log-probs; a Megatron trainer (real megatron-core, one gloo rank)
scores the same tokens from the rollout batch, whose rows carry the sampling
settings. They must agree to 1e-4, and the sampler's logged probabilities must
be the frequencies it actually draws with.
"""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from chatlearn.utils.launch import spawn
from chatlearn.utils.tiny_assets import ensure_tiny_assets

PROMPTS = [[1, 20, 30, 40], [1, 25, 35], [1, 50, 60, 70, 80]]
FIRST_TOKEN_SAMPLES = 3000


def _score_worker(rank: int, world: int, model_dir: str, batches: list[dict], out: str) -> None:
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings

    module = MegatronModule("trainer")
    module.settings = MegatronSettings(load=model_dir, trainable=True, forward_micro_batch_size=3)
    module.setup()
    torch.save([module.forward_step(batch, 0)["logprobs"] for batch in batches], out)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Rollout batches at (T, top_p) = (1, 1) and (0.5, 0.8), and many first tokens at (0.5, 0.8)."""
    from chatlearn.models.vllm_module import VLLMModule

    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path_factory.mktemp("assets"))
    model_dir = str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir)
    saved_env, threads = os.environ.copy(), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", torch.set_num_threads)  # vLLM's CPU worker replaces it
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        base = dict(load=model_dir, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, seed=0, ignore_eos=True,
                    new_token_limit=True, max_new_tokens=12, n=4)
        policy = VLLMModule("policy", model_args=base)
        policy.setup()
        try:
            batches = {}
            for temperature, top_p in ((1.0, 1.0), (0.5, 0.8)):
                policy._model_args_override = {**base, "temperature": temperature, "top_p": top_p}
                batches[(temperature, top_p)] = policy.generate({"prompt_ids": PROMPTS})
            policy._model_args_override = {**base, "temperature": 0.5, "top_p": 0.8, "max_new_tokens": 1,
                                           "n": FIRST_TOKEN_SAMPLES}
            first = policy.generate({"prompt_ids": PROMPTS[:1]})
        finally:
            policy.shutdown()
    os.environ.clear()
    os.environ.update(saved_env)
    torch.set_num_threads(threads)
    # The same rollouts once more without the rows' settings: what a trainer scoring the raw softmax sees.
    batches["raw"] = {k: v for k, v in batches[(0.5, 0.8)].items() if not k.startswith("sampling_")}
    out = str(tmp_path_factory.mktemp("scores") / "logprobs.pt")
    keys = list(batches)
    spawn(_score_worker, 1, model_dir, [batches[k] for k in keys], out)
    trainer = dict(zip(keys, torch.load(out)))
    return batches, trainer, first


@pytest.mark.parametrize("setting", [(1.0, 1.0), (0.5, 0.8)], ids=["T1", "T0.5-top_p0.8"])
def test_trainer_scores_sampled_tokens_like_the_sampler(sampled, setting):
    batches, trainer, _ = sampled
    batch = batches[setting]
    assert batch["sampling_temperature"].unique().tolist() == [setting[0]]
    assert batch["sampling_top_p"].unique().tolist() == pytest.approx([setting[1]])
    mask = batch["loss_mask"].bool()
    gap = (trainer[setting][mask] - batch["old_logprobs"][mask]).abs()
    print(f"T={setting[0]} top_p={setting[1]}: |trainer - sampler| mean {gap.mean():.2e} max {gap.max():.2e} "
          f"over {int(mask.sum())} tokens")
    assert gap.max() < 1e-4


def test_scoring_without_the_rollouts_settings_would_not_match(sampled):
    """The check above can fail: the raw softmax is not what was sampled at T=0.5, top-p 0.8."""
    batches, trainer, _ = sampled
    mask = batches["raw"]["loss_mask"].bool()
    gap = (trainer["raw"][mask] - batches["raw"]["old_logprobs"][mask]).abs()
    assert gap.max() > 0.05


def test_sampled_frequencies_match_the_logged_probabilities(sampled):
    _, _, first = sampled
    tokens = [ids[0] for ids in first["response_ids"]]
    probs = {}
    for token, logprob, prompt_len in zip(tokens, first["old_logprobs"], first["prompt_len"]):
        probs.setdefault(token, float(logprob[prompt_len].exp()))
    counts = Counter(tokens)
    n = len(tokens)
    # The logged probabilities are of the renormalised nucleus: the tokens drawn hold all of it.
    assert sum(probs.values()) == pytest.approx(1.0, abs=0.01)
    for token, p in probs.items():
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(counts[token] / n - p) < 5 * sigma + 1e-3, (token, counts[token] / n, p)
