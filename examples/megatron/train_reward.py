"""Reward-model fitting on megatron-core: a scalar head trained on preference pairs.

    python examples/megatron/train_reward.py --load HF_DIR --data pairs.jsonl --save OUT_DIR \
        [--eval-data heldout_pairs.jsonl] [--nproc 1 --tp 1 --pp 1] [--epochs 8 --lr 1e-3 --global-batch 32]

Supports: Llama/Qwen2; ``--load`` is a reward-model checkpoint
(``*ForSequenceClassification``) or a causal LM, whose backbone then gets a
new scalar head (``make_score_checkpoint``); any TP x PP x DP layout. Data:
JSON lines ``{"prompt", "chosen", "rejected"}``. Loss: Bradley-Terry,
``-log sigmoid(r(chosen) - r(rejected))`` with r the head's output at the
last token (the EOS after the response). Writes a HF checkpoint to ``--save``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standalone import fit, launch, training_parser  # noqa: E402
from train_sft import tokenize  # noqa: E402

from chatlearn.algorithms.core import LossAggregator, last_token_index  # noqa: E402
from chatlearn.data.batching import concat_padded  # noqa: E402
from chatlearn.data.prompts import read_jsonl  # noqa: E402
from chatlearn.models.megatron import MegatronModule  # noqa: E402


class PairwiseRewardTrainer(MegatronModule):
    """Each micro-batch holds ``chosen_*`` and ``rejected_*``; both run as one batch of 2b rows."""

    def train_step(self, data_list, iteration):
        stacked = [{"input_ids": concat_padded([mb["chosen_input_ids"], mb["rejected_input_ids"]]),
                    "attention_mask": concat_padded([mb["chosen_attention_mask"], mb["rejected_attention_mask"]]),
                    "sample_valid": torch.cat([mb["sample_valid"], mb["sample_valid"]])}
                   for mb in data_list]
        return super().train_step(stacked, iteration)

    def loss_fn(self, logits, micro_batch):
        rows = torch.arange(logits.shape[0], device=logits.device)
        scores = logits[rows, last_token_index(micro_batch["attention_mask"].to(logits.device)), 0].float()
        chosen, rejected = scores.chunk(2)
        agg = LossAggregator(micro_batch, micro_batch["attention_mask"].to(logits.device))
        loss = agg.sequence_mean(-F.logsigmoid(chosen - rejected), rows_per_sample=2)
        return loss, {"loss": loss.detach(),
                      "accuracy": agg.sequence_mean((chosen > rejected).float(), rows_per_sample=2)}


def pair_sample(tokenizer, record: dict) -> dict:
    sample = {}
    for side in ("chosen", "rejected"):
        ids = tokenize(tokenizer, record["prompt"], record[side])["input_ids"]
        sample[f"{side}_input_ids"] = ids
        sample[f"{side}_attention_mask"] = torch.ones_like(ids)
    return sample


def pair_accuracy(module: MegatronModule, samples: list[dict], batch_size: int = 32) -> float | None:
    """Share of pairs whose chosen response scores higher (None on ranks without the scores)."""
    from chatlearn.data.batching import collate

    correct, total = 0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size])
        ids = concat_padded([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = concat_padded([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        out = module.forward_step({"input_ids": ids}, 0)
        if not out:
            return None
        scores = out["values"][torch.arange(ids.shape[0]), last_token_index(mask)]
        chosen, rejected = scores.chunk(2)
        correct += int((chosen > rejected).sum())
        total += chosen.numel()
    return correct / total


def _train(rank: int, world: int, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from chatlearn.models.megatron import MegatronSettings
    from chatlearn.models.megatron.model import hf_arch, load_hf_config

    tokenizer = AutoTokenizer.from_pretrained(args.load)
    samples = [pair_sample(tokenizer, r) for r in read_jsonl(args.data)]
    load = args.load
    if not hf_arch(load_hf_config(load)).num_labels:
        load = os.path.join(args.save + ".init")
        if rank == 0:
            from chatlearn.models.megatron.hf_convert import make_score_checkpoint

            make_score_checkpoint(args.load, load, seed=args.seed)
        if world > 1:
            torch.distributed.barrier()
    module = PairwiseRewardTrainer("reward")
    module.settings = MegatronSettings(load=load, tp=args.tp, pp=args.pp, trainable=True, lr=args.lr,
                                       seed=args.seed)
    module.setup()
    history = fit(module, samples, epochs=args.epochs, global_batch_size=args.global_batch, drop_last=args.drop_last,
                  micro_batch_size=args.micro_batch, seed=args.seed, desc="reward model")
    module.save_hf_checkpoint(args.save)
    if history:
        tail = history[-max(1, len(history) // 5):]
        accuracy = sum(float(m["accuracy"]) for m in tail) / len(tail)
        print(f"[reward] {len(history)} steps, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, "
              f"train pair accuracy (last 20%) {accuracy:.2f}; saved {args.save}", flush=True)
    if args.eval_data:
        held = pair_accuracy(module, [pair_sample(tokenizer, r) for r in read_jsonl(args.eval_data)])
        if held is not None and rank == world - 1:
            print(f"[reward] held-out pair accuracy {held:.2f} ({args.eval_data})", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = training_parser(__doc__.split("\n")[0], "JSON lines with prompt, chosen, rejected", epochs=8, lr=1e-3)
    p.add_argument("--eval-data", default=None, help="held-out pairs: report the pair accuracy after training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch(_train, args.nproc, args)


if __name__ == "__main__":
    main()
