"""RLOO's leave-one-out advantages and REINFORCE++'s KL-shaped reward-to-go, whitened over a
global batch split across data-parallel ranks, against values worked out by hand."""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.algorithms.core import whiten_advantages
from chatlearn.algorithms.reinforce_pp import ReinforcePPConfig, ReinforcePPRollouts, reward_to_go
from chatlearn.algorithms.rloo import RLOOConfig, RLOORollouts, leave_one_out_advantages
from chatlearn.data.batching import split_batch, split_global_batch
from chatlearn.utils.launch import spawn


def test_leave_one_out_by_hand():
    # A group of 3, a group of 2 and a tied group of 3 would not lay out in one tensor: one size at a time.
    assert leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.0]), 3).tolist() == pytest.approx([1.0, -0.5, -0.5])
    # Two responses: each one's baseline is the other's reward.
    assert leave_one_out_advantages(torch.tensor([0.3, 0.7, 2.0, -1.0]), 2).tolist() == \
        pytest.approx([-0.4, 0.4, 3.0, -3.0])
    # Ties: a group that scored all alike has no advantage; a tie inside a group shares one.
    assert leave_one_out_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0]), 3).tolist() == \
        pytest.approx([0.0, 0.0, 0.0, -1.0, 0.5, 0.5])


def test_leave_one_out_is_the_scaled_group_centring():
    rewards = torch.randn(20, generator=torch.Generator().manual_seed(0))
    for n in (2, 4, 5):
        grouped = rewards.view(-1, n)
        want = n / (n - 1) * (grouped - grouped.mean(dim=1, keepdim=True))
        assert torch.allclose(leave_one_out_advantages(rewards, n), want.reshape(-1), atol=1e-6)


def test_leave_one_out_refuses_a_group_of_one_and_a_ragged_batch():
    with pytest.raises(ValueError, match="RLOO needs n >= 2"):
        leave_one_out_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="5 rewards do not split into groups of 2"):
        leave_one_out_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="n >= 2"):
        RLOORollouts(RLOOConfig(), group_size=1)


def _rollouts(scores, log_ratio, mask) -> dict:
    """A rollout batch whose old_logprobs - ref_logprobs is ``log_ratio``."""
    old = torch.tensor(log_ratio) - 1.0
    return {"scores": torch.tensor(scores), "old_logprobs": old, "ref_logprobs": torch.full_like(old, -1.0),
            "loss_mask": torch.tensor(mask)}


def test_rloo_subtracts_the_sequence_kl_from_the_score_before_the_baseline():
    # Two groups of two; response 0 drifted from the reference (k1 summed over its tokens: 1.0).
    mask = [[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 0]]
    log_ratio = [[9.0, 0.5, 0.5, 9.0], [0, 0, 0, 0], [0, 0.2, 0, 0], [0, -0.2, 0.4, 0]]
    batch = _rollouts([1.0, 1.0, 1.0, 0.0], log_ratio, mask)
    out, metrics = RLOORollouts(RLOOConfig(kl_coef=0.1), group_size=2).process(batch, 0)
    # rewards: 1 - 0.1 * 1.0, 1 - 0, 1 - 0.1 * 0.2, 0 - 0.1 * 0.2: the tie in score is broken by the KL.
    rewards = [0.9, 1.0, 0.98, -0.02]
    want = [rewards[0] - rewards[1], rewards[1] - rewards[0], rewards[2] - rewards[3], rewards[3] - rewards[2]]
    assert out["advantages"].flatten().tolist() == pytest.approx([a * m for a, row in zip(want, mask) for m in row])
    assert metrics["kl"] == pytest.approx((1.0 + 0.0 + 0.2 + 0.2) / 4)
    assert metrics["reward/mean"] == pytest.approx(0.75)  # the scores, not the KL-penalised rewards
    assert metrics["advantages/abs_mean"] == pytest.approx((0.1 + 0.1 + 1.0 + 1.0) / 4)
    assert metrics["groups/solved_none_or_all"] == 0.5


def test_rloo_with_the_kl_out_of_the_reward_needs_no_log_probs_and_ties_teach_nothing():
    batch = {"scores": torch.tensor([1.0, 1.0, 0.0, 1.0]), "loss_mask": torch.ones(4, 3)}
    processor = RLOORollouts(RLOOConfig(kl_in_reward=False), group_size=2)
    out, metrics = processor.process(batch, 0)
    assert out["advantages"][:, 0].tolist() == [0.0, 0.0, -1.0, 1.0]
    assert "kl" not in metrics  # the trainer's KL loss reports it
    assert [processor.is_trainable(s) for s in split_batch(out)] == [False, False, True, True]
    with pytest.raises(KeyError, match="ref_logprobs"):
        RLOORollouts(RLOOConfig(), group_size=2).process({**batch, "old_logprobs": torch.zeros(4, 3)}, 0)


def test_reward_to_go_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 0.05, 0.85, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    assert reward_to_go(rewards, mask, 1.0).tolist()[0] == pytest.approx([0, 0.8, 0.9, 0.85, 0])
    # gamma 0.5: 0.85; 0.05 + 0.5 * 0.85 = 0.475; -0.1 + 0.5 * 0.475 = 0.1375
    assert reward_to_go(rewards, mask, 0.5).tolist()[0] == pytest.approx([0, 0.1375, 0.475, 0.85, 0])


def test_reinforce_pp_rollouts_put_the_k1_kl_on_every_token_and_the_score_on_the_last():
    batch = _rollouts([1.0], [[0.0, 0.2, -0.1, 0.3, 0.0]], [[0, 1, 1, 1, 0]])
    out, metrics = ReinforcePPRollouts(ReinforcePPConfig(kl_coef=0.5, gamma=0.5)).process(batch, 0)
    # token rewards -0.5 * (0.2, -0.1, 0.3) + (0, 0, 1) = (-0.1, 0.05, 0.85): the returns above
    assert out["advantages"].tolist()[0] == pytest.approx([0, 0.1375, 0.475, 0.85, 0])
    assert metrics["kl"] == pytest.approx(0.4)
    assert metrics["returns/mean"] == pytest.approx((0.1375 + 0.475 + 0.85) / 3)
    assert metrics["reward/mean"] == 1.0
    with pytest.raises(KeyError, match="old_logprobs"):
        ReinforcePPRollouts(ReinforcePPConfig()).process({"scores": torch.ones(1), "loss_mask": torch.ones(1, 2)}, 0)


# --- REINFORCE++'s whitening over a global batch: padding rows out, every data-parallel rank in ----------------

def _odd_rollout_batch() -> tuple[dict, list[list[float]]]:
    """Five responses of different lengths (an odd batch: DP2 pads one rank) and their returns worked out
    with plain loops, independently of reward_to_go."""
    g = torch.Generator().manual_seed(3)
    lengths, width, gamma, kl_coef = [3, 1, 4, 2, 3], 7, 0.9, 0.1
    mask = torch.zeros(5, width)
    for row, n in enumerate(lengths):
        mask[row, 2:2 + n] = 1.0
    log_ratio = torch.randn(5, width, generator=g) * 0.3
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0])
    batch = _rollouts(scores.tolist(), log_ratio.tolist(), mask.tolist())
    cfg = ReinforcePPConfig(kl_coef=kl_coef, gamma=gamma)
    out, _ = ReinforcePPRollouts(cfg).process(batch, 0)
    returns = []
    for row, n in enumerate(lengths):
        rewards = [-kl_coef * float(log_ratio[row, 2 + t]) for t in range(n)]
        rewards[-1] += float(scores[row])
        returns.append([sum(gamma ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)])
    return out, returns


def _whitened_by_hand(returns: list[list[float]]) -> list[list[float]]:
    flat = torch.tensor([r for row in returns for r in row], dtype=torch.float64)
    mean, std = flat.mean(), flat.std()  # the unbiased variance masked_whiten uses
    return [[(r - float(mean)) / float(std) for r in row] for row in returns]


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _real_rows(data_list: list[dict]) -> list[list[float]]:
    rows = []
    for mb in data_list:
        for adv, mask, valid in zip(mb["advantages"], mb["loss_mask"], mb["sample_valid"]):
            if valid:
                rows.append(adv[mask > 0].tolist())
    return rows


def _split(batch: dict, dp: int) -> list[list[dict]]:
    rows = [{k: batch[k][i] for k in ("advantages", "loss_mask")} for i in range(len(batch["advantages"]))]
    return split_global_batch(rows, dp, micro_batch_size=2)


def test_reinforce_pp_whitening_on_one_rank_leaves_padding_rows_out():
    batch, returns = _odd_rollout_batch()
    assert [len(r) for r in _real_rows(_split(batch, 1)[0])] == [3, 1, 4, 2, 3]
    assert _flat(_real_rows(_split(batch, 1)[0])) == pytest.approx(_flat(returns), abs=1e-6)
    (data_list,) = _split(batch, 1)  # 5 rows in micro-batches of 2: one padding row
    # A padding row with response tokens and a huge advantage must not move the statistics either.
    data_list[-1]["loss_mask"][-1] = 1.0
    data_list[-1]["advantages"][-1] = 1e6
    whitened = whiten_advantages(data_list, group=None)
    want = _whitened_by_hand(returns)
    assert _flat(_real_rows(whitened)) == pytest.approx(_flat(want), abs=1e-5)


def _dp2_worker(rank: int, world: int, results: dict) -> None:
    import torch.distributed as dist

    batch, _ = _odd_rollout_batch()
    data_list = _split(batch, world)[rank]
    results[rank] = _real_rows(whiten_advantages(data_list, group=dist.group.WORLD))


def test_reinforce_pp_whitening_spans_every_data_parallel_rank():
    import multiprocessing

    with multiprocessing.Manager() as manager:
        results = manager.dict()
        spawn(_dp2_worker, 2, results)
        per_rank = [results[0], results[1]]
    _, returns = _odd_rollout_batch()
    assert [len(rows) for rows in per_rank] == [3, 2]  # the lower rank takes the odd sample
    # Each rank's rows, whitened with the statistics of all five rows (not of its own shard's).
    assert _flat(per_rank[0] + per_rank[1]) == pytest.approx(_flat(_whitened_by_hand(returns)), abs=1e-5)


# --- The trainers on Megatron: where the KL goes, and the whitening ---------------------------------------------

def _trainer_worker(rank: int, world: int, model_dir: str, out_dir: str) -> None:
    import dataclasses

    from chatlearn.models.megatron.model import unwrap
    from chatlearn.models.megatron.module import MegatronModule, MegatronSettings
    from chatlearn.roles.policy_trainer import ReinforcePPTrainer, RLOOTrainer

    g = torch.Generator().manual_seed(7)
    results = {}
    for cls, key, values in ((RLOOTrainer, "kl_in_reward", (True, False)),
                             (ReinforcePPTrainer, "whiten_advantages", (True, False))):
        class Trainer(cls):
            model_args = {}  # the config class's defaults (no config file in this process)

        module = Trainer("policy_trainer")
        module.settings = MegatronSettings(load=model_dir, trainable=True, optimizer="sgd", lr=0.0, clip_grad=0.0)
        module.setup()
        vocab = int(unwrap(module.model).vocab_size)
        mask = torch.zeros(3, 9)
        for row in range(3):
            mask[row, 3:9 - row] = 1.0
        batch = {"input_ids": torch.randint(4, vocab, (3, 9), generator=g), "loss_mask": mask,
                 "advantages": (torch.randn(3, 9, generator=g) + 0.5) * mask,
                 "ref_logprobs": -torch.rand(3, 9, generator=g) * mask}
        # old = the trainer's own log-probs: every ratio is 1, so the surrogate is -advantages
        batch["old_logprobs"] = MegatronModule.forward_step(module, batch, 0)["logprobs"] * mask
        for value in values:
            module.cfg = dataclasses.replace(module.cfg, **{key: value})
            module.before_episode(0)
            metrics = module.train_step([batch], 0)
            grads = {n: p.main_grad.clone() for n, p in unwrap(module.model).named_parameters()}
            results[(key, value)] = {"metrics": metrics, "grads": grads}
        results[("advantages", key)] = batch["advantages"]
    torch.save(results, os.path.join(out_dir, "trainers.pt"))


def test_rloo_trainer_keeps_the_kl_out_of_the_loss_and_reinforce_pp_trainer_whitens(tmp_path):
    from chatlearn.utils.tiny_assets import ensure_tiny_assets

    root = os.environ.get("CHATLEARN_TEST_ASSETS") or str(tmp_path / "assets")
    spawn(_trainer_worker, 1, str(ensure_tiny_assets(root, seed=0, arch="llama").model_dir), str(tmp_path))
    r = torch.load(tmp_path / "trainers.pt")

    in_reward, in_loss = r[("kl_in_reward", True)], r[("kl_in_reward", False)]
    assert "kl" not in in_reward["metrics"]  # the driver's rewards carry it (and report it)
    assert in_loss["metrics"]["kl"] > 0.01  # GRPO's k3 loss term
    assert in_loss["metrics"]["loss/policy"] == pytest.approx(in_reward["metrics"]["loss/policy"], rel=1e-6)
    name = "output_layer.weight"
    assert not torch.allclose(in_loss["grads"][name], in_reward["grads"][name])  # the KL term's gradient

    # At ratio 1 the token-mean surrogate is minus the advantages' token mean: 0 once whitened.
    whitened, raw = r[("whiten_advantages", True)]["metrics"], r[("whiten_advantages", False)]["metrics"]
    advantages = r[("advantages", "whiten_advantages")]
    mask = advantages != 0
    assert raw["loss/policy"] == pytest.approx(-float(advantages[mask].mean()), rel=1e-5)
    assert abs(raw["loss/policy"]) > 0.1
    assert abs(whitened["loss/policy"]) < 1e-5


# --- docs/algorithms.md's settings tables are the config classes' defaults ----------------------------------------

def _settings_table(heading: str) -> dict[str, str]:
    """{key: default as written} from the first table under ``heading`` in docs/algorithms.md."""
    import re

    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "algorithms.md")
    with open(doc) as f:
        section = f.read().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = re.findall(r"`(\w+)`", cells[0]) if line.startswith("| `") else []
        for key, default in zip(keys, cells[1].split(", ") if keys else []):
            table[key] = default.strip("`")
    return table


@pytest.mark.parametrize("heading, config", [
    ("## GRPO (`GRPOEngine`)", "chatlearn.algorithms.grpo:GRPOConfig"),
    ("## RLOO (`RLOOEngine`)", "chatlearn.algorithms.rloo:RLOOConfig"),
    ("## REINFORCE++ (`ReinforcePPEngine`)", "chatlearn.algorithms.reinforce_pp:ReinforcePPConfig"),
])
def test_the_docs_settings_tables_give_every_key_and_its_default(heading, config):
    import dataclasses
    import importlib

    module, name = config.split(":")
    defaults = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    table = _settings_table(heading)
    assert sorted(table) == sorted(defaults)
    for key, written in table.items():
        want = defaults[key]
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            assert float(written) == want, key
        else:
            assert written == str(want), key
