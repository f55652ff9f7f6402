"""The RL losses and advantage estimators against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from chatlearn.data.batching import split_batch

from chatlearn.algorithms.core import (LossAggregator, entropy_from_logits, masked_mean,
                                       masked_whiten, masked_whiten_global, nucleus_mask, sampling_logprobs,
                                       sequence_logprob, shift_to_token_positions)
from chatlearn.algorithms.dpo import DPOConfig, DPOPairs, dpo_loss, rank_pair
from chatlearn.algorithms.grpo import GRPOConfig, GRPORollouts, group_advantages, k3_kl, top_k_in_groups
from chatlearn.algorithms.ppo import (AdaptiveKLController, PPOConfig, PPORollouts, explained_variance,
                                      gae_advantages, kl_shaped_rewards, policy_loss, value_loss)

# One row: a prompt of 2 tokens, a response of 3 (positions 2..4), one pad.
MASK = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)


def test_masked_mean_and_whiten():
    x = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 9.0]])
    assert masked_mean(x, MASK).item() == pytest.approx(2.0)
    w = masked_whiten(x, MASK)
    # mean 2, unbiased std 1 -> (-1, 0, 1) on the response; 0 elsewhere
    assert w.tolist()[0] == pytest.approx([0, 0, -1, 0, 1, 0], abs=1e-6)


def test_logprobs_entropy_and_shift_are_aligned_with_tokens():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # after token 0: p(2) = 3/6
    ids = torch.tensor([[1, 2, 0]])
    logp = sampling_logprobs(logits, ids)
    assert logp[0, 0] == 0  # nothing predicts the first token
    assert logp[0, 1].item() == pytest.approx(math.log(0.5))
    assert logp[0, 2].item() == pytest.approx(math.log(0.25))
    entropy = entropy_from_logits(logits)
    assert entropy[0, 2].item() == pytest.approx(math.log(4))  # uniform after token 1
    assert shift_to_token_positions(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[0.0, 1.0, 2.0]]
    assert sequence_logprob(logp, torch.tensor([[0, 1, 1]])).item() == pytest.approx(math.log(0.125))


def test_kl_shaped_rewards_put_the_score_on_the_last_response_token():
    logp = torch.tensor([[0, 0, -1.0, -1.0, -1.0, 0]])
    ref = torch.tensor([[0, 0, -1.5, -0.5, -1.0, 0]])
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0]), logp, ref, MASK, kl_coef=0.1)
    assert kl.tolist()[0] == pytest.approx([0, 0, 0.5, -0.5, 0, 0])
    assert rewards.tolist()[0] == pytest.approx([0, 0, -0.05, 0.05, 2.0, 0])


def test_gae_by_hand():
    rewards = torch.tensor([[0, 0, 1.0, 0.0, 2.0, 0]])
    values = torch.tensor([[5, 5, 0.5, 1.0, 1.5, 5]])  # outside the mask: ignored
    adv, ret = gae_advantages(rewards, values, MASK, gamma=1.0, lam=1.0)
    # lam = gamma = 1: advantage = reward-to-go - V
    assert adv.tolist()[0] == pytest.approx([0, 0, 3.0 - 0.5, 2.0 - 1.0, 2.0 - 1.5, 0])
    assert ret.tolist()[0] == pytest.approx([0, 0, 3.0, 2.0, 2.0, 0])
    adv, _ = gae_advantages(rewards, values, MASK, gamma=0.9, lam=0.5)
    d4 = 2.0 - 1.5
    d3 = 0.0 + 0.9 * 1.5 - 1.0
    d2 = 1.0 + 0.9 * 1.0 - 0.5
    a3 = d3 + 0.45 * d4
    assert adv.tolist()[0] == pytest.approx([0, 0, d2 + 0.45 * a3, a3, d4, 0])


def test_policy_loss_clips_and_reports():
    old = torch.zeros(1, 6)
    logp = torch.tensor([[0, 0, math.log(1.5), math.log(0.5), 0.0, 0]])
    adv = torch.tensor([[0, 0, 1.0, 1.0, -1.0, 0]])
    loss, metrics = policy_loss(logp, old, adv, LossAggregator({}, MASK), clip_eps=0.2)
    # token 2: ratio 1.5, A>0 -> clipped to 1.2 -> -1.2; token 3: ratio 0.5, A>0 -> min is -0.5
    # token 4: ratio 1, A<0 -> 1.0
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3)
    assert metrics["clipfrac"].item() == pytest.approx(1 / 3)
    k3 = (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))
    assert metrics["approx_kl"].item() == pytest.approx(k3 / 3, rel=1e-5)


def test_value_loss_and_explained_variance():
    old = torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0]])
    new = torch.tensor([[0, 0, 2.0, 1.1, 0.0, 0]])
    ret = torch.tensor([[0, 0, 2.0, 1.0, 1.0, 0]])
    loss, metrics = value_loss(new, old, ret, LossAggregator({}, MASK), clip_eps=0.2)
    # token 2: unclipped err 0, clipped (1.2 - 2)^2 = 0.64 -> 0.64; token 3: 0.01 both; token 4: 1 vs 0.04 -> 1
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 1.0) / 3)
    assert metrics["value/clipfrac"].item() == pytest.approx(1 / 3)
    assert explained_variance(ret, ret, MASK).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret), ret, MASK).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_samples=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(3.0, n_samples=10)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_ppo_rollouts_add_advantages_and_metrics():
    batch = {"scores": torch.tensor([1.0]), "old_logprobs": torch.zeros(1, 6), "ref_logprobs": torch.zeros(1, 6),
             "old_values": torch.zeros(1, 6), "loss_mask": MASK.long()}
    out, metrics = PPORollouts(PPOConfig(init_kl_coef=0.1, gamma=1.0, lam=1.0)).process(batch, 0)
    assert out["advantages"].tolist()[0] == pytest.approx([0, 0, 1, 1, 1, 0])
    assert metrics["reward/mean"] == 1.0 and metrics["kl"] == 0.0 and metrics["response_length/mean"] == 3
    with pytest.raises(KeyError, match="old_values"):
        PPORollouts(PPOConfig()).process({k: v for k, v in batch.items() if k != "old_values"}, 0)


def test_grpo_group_advantages_top_k_and_kl():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(scores, group_size=3)
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert adv.tolist() == pytest.approx([2 / 3 / std, -1 / 3 / std, -1 / 3 / std, 0, 0, 0], rel=1e-4)
    assert top_k_in_groups(torch.tensor([0.1, 0.9, 0.5, 3.0, 2.0, 1.0]), 3, 2).tolist() == [1, 2, 3, 4]
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1) + 1 - 1)

    mask = torch.ones(4, 2)
    batch = {"scores": torch.tensor([1.0, 0.0, 0.5, 0.5]), "loss_mask": mask, "text": ["a", "b", "c", "d"]}
    processor = GRPORollouts(GRPOConfig(select_top_k=1), group_size=2)
    out, metrics = processor.process(batch, 0)
    assert out["text"] == ["a", "c"]  # the better of each pair (ties: the first)
    assert out["advantages"][1].tolist() == [0.0, 0.0]  # a tied group teaches nothing
    assert metrics["groups/solved_none_or_all"] == 0.5
    assert len(batch["advantages"]) == 4  # every response's advantage stays on the batch (rollout dump)
    assert [processor.is_trainable(s) for s in split_batch(out)] == [True, False]
    with pytest.raises(ValueError, match="n >= 2"):
        GRPORollouts(GRPOConfig(), group_size=1)


def test_dpo_loss_by_hand_and_pairing():
    two_rows = LossAggregator({}, torch.ones(2, 1))  # one pair: its chosen and rejected rows
    loss, metrics = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                             torch.tensor([-2.0]), beta=0.5, agg=two_rows)
    margin = 0.5 * ((-1 + 2) - (-3 + 2))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))))
    assert metrics["dpo/accuracy"].item() == 1.0
    assert rank_pair((0.2, 0.7)) == (1, 0) and rank_pair((1.0, 1.0)) is None

    ids = torch.arange(8).view(4, 2)
    batch = {"scores": torch.tensor([0.0, 1.0, 1.0, 1.0]), "input_ids": ids, "loss_mask": torch.ones(4, 2),
             "ref_logprobs": torch.zeros(4, 2)}
    out, metrics = DPOPairs(DPOConfig()).process(batch, 0)
    assert out["chosen_input_ids"].tolist() == [[2, 3]] and out["rejected_input_ids"].tolist() == [[0, 1]]
    assert metrics["pairs/kept_fraction"] == 0.5  # the tied second pair is dropped


def test_dpo_pairs_carry_the_prompts_sampling_settings_and_ties_leave_nothing():
    batch = {"scores": torch.tensor([0.0, 1.0, 1.0, 1.0]), "input_ids": torch.arange(8).view(4, 2),
             "loss_mask": torch.ones(4, 2), "ref_logprobs": torch.zeros(4, 2),
             "sampling_temperature": torch.tensor([0.5, 0.5, 0.7, 0.7]), "sampling_top_k": torch.zeros(4).long(),
             "sampling_top_p": torch.full((4,), 0.8)}
    out, _ = DPOPairs(DPOConfig()).process(batch, 0)
    assert out["sampling_temperature"].tolist() == [0.5]
    ties = {**batch, "scores": torch.ones(4)}
    out, metrics = DPOPairs(DPOConfig()).process(ties, 0)
    assert split_batch(out) == [] and metrics["pairs/kept_fraction"] == 0.0


# -- the sampling distribution --------------------------------------------------------------

def _vllm_filtered_logprobs(z, k, p):
    """vLLM's own top-k/top-p (what its sampler applies) and its processed log-probs."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    return apply_top_k_top_p_pytorch(z.clone(), k, p).log_softmax(-1)


@pytest.mark.parametrize("k,p", [(None, 0.8), (5, None), (7, 0.6), (None, 0.97)])
def test_nucleus_mask_matches_vllms_filter(k, p):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 50, generator=g) * 3
    kt = None if k is None else torch.full((64,), k)
    pt = None if p is None else torch.full((64,), p)
    want = torch.isfinite(_vllm_filtered_logprobs(z, kt, pt))
    assert torch.equal(nucleus_mask(z, kt, pt), want)


def test_sampling_logprobs_equal_vllms_processed_logprobs_and_stay_finite():
    g = torch.Generator().manual_seed(1)
    b, s, v = 3, 6, 40
    logits = torch.randn(b, s, v, generator=g) * 2
    ids = torch.randint(0, v, (b, s), generator=g)
    temperature, top_k, top_p = torch.tensor([0.5, 1.0, 0.7]), torch.tensor([0, 5, 0]), torch.tensor([0.8, 1.0, 0.9])
    mask = torch.ones(b, s)
    got = sampling_logprobs(logits, ids, temperature, top_k, top_p, mask)
    for row in range(b):
        z = logits[row, :-1] / temperature[row]
        k = torch.full((s - 1,), int(top_k[row])) if top_k[row] > 0 else None
        want = _vllm_filtered_logprobs(z, k, torch.full((s - 1,), float(top_p[row])))
        picked = want.gather(1, ids[row, 1:, None]).squeeze(1)
        inside = torch.isfinite(picked)
        assert torch.allclose(got[row, 1:][inside], picked[inside], atol=1e-6)
        # A token outside the filter (random ids here; never a sampled one) stays finite.
        assert torch.isfinite(got[row]).all()
    assert (got[:, 0] == 0).all()
    # No filter, no temperature: the plain log-softmax.
    plain = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(sampling_logprobs(logits, ids)[:, 1:], plain, atol=1e-6)


def test_sampling_logprobs_gradients_flow_through_the_nucleus():
    logits = torch.randn(2, 4, 30, requires_grad=True)
    ids = torch.randint(0, 30, (2, 4))
    out = sampling_logprobs(logits, ids, torch.tensor([0.5, 2.0]), None, torch.tensor([0.7, 0.9]))
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_loss_aggregation_modes_over_a_split_batch_equal_the_whole_batch():
    """Shares of a global batch split into padded micro-batches add up to the whole batch's value."""
    from chatlearn.algorithms.core import GLOBAL_NUM_SAMPLES, GLOBAL_NUM_TOKENS
    from chatlearn.data.batching import split_global_batch

    g = torch.Generator().manual_seed(2)
    rows = [{"x": torch.randn(5, generator=g), "loss_mask": (torch.rand(5, generator=g) > 0.3).float()}
            for _ in range(7)]
    x = torch.stack([r["x"] for r in rows])
    m = torch.stack([r["loss_mask"] for r in rows])
    whole = {"token-mean": (x * m).sum() / m.sum(),
             "seq-mean-token-mean": ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean(),
             "seq-mean-token-sum": (x * m).sum(1).mean()}
    for mode, want in whole.items():
        total = 0.0
        for rank in split_global_batch(rows, 2, 3):
            for mb in rank:
                mb = {**mb, GLOBAL_NUM_TOKENS: m.sum(), GLOBAL_NUM_SAMPLES: torch.tensor(7.0)}
                total += LossAggregator(mb, mb["loss_mask"]).loss(mb["x"], mode)
        assert float(total) == pytest.approx(float(want), rel=1e-6), mode


def test_masked_whiten_global_on_one_rank_is_masked_whiten():
    x = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 9.0]])
    assert torch.allclose(masked_whiten_global(x, MASK), masked_whiten(x, MASK), atol=1e-6)


def test_dpo_nll_term_adds_the_chosen_per_token_nll():
    two_rows = LossAggregator({}, torch.ones(2, 1))
    args = (torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    plain, _ = dpo_loss(*args, beta=0.5, agg=two_rows)
    with_nll, metrics = dpo_loss(*args, beta=0.5, agg=two_rows, nll_coef=0.5, chosen_tokens=torch.tensor([4.0]))
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * 2.0 / 4)
    assert metrics["dpo/chosen_nll"].item() == pytest.approx(0.5)
