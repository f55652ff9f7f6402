"""Supervised fine-tuning on megatron-core: the warm start before RLHF.

    python examples/megatron/train_sft.py --load HF_DIR --data sft.jsonl --save OUT_DIR \
        [--nproc 1 --tp 1 --pp 1] [--epochs 3 --lr 1e-3 --global-batch 32 --micro-batch 8]

Supports: Llama/Qwen2 checkpoints in Hugging Face format, any TP x PP x DP
layout (``--nproc`` ranks, DP = nproc / (tp * pp)), the loss on response
tokens only. Data: JSON lines ``{"prompt": ..., "response": ...}``; the
response is followed by the tokenizer's EOS, so the model learns to stop.
Writes a Hugging Face checkpoint (transformers and vLLM load it) to ``--save``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from standalone import fit, launch, training_parser  # noqa: E402

from chatlearn.data.prompts import read_jsonl  # noqa: E402


def tokenize(tokenizer, prompt: str, response: str) -> dict:
    """Prompt tokens as vLLM sees them (with BOS), then the response and EOS; loss on the latter."""
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    return {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask)}


def _train(rank: int, world: int, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from chatlearn.models.megatron import MegatronModule, MegatronSettings

    tokenizer = AutoTokenizer.from_pretrained(args.load)
    samples = [tokenize(tokenizer, r["prompt"], r["response"]) for r in read_jsonl(args.data)]
    module = MegatronModule("sft")
    module.settings = MegatronSettings(load=args.load, tp=args.tp, pp=args.pp, trainable=True, lr=args.lr,
                                       pad_token_id=tokenizer.pad_token_id or 0, seed=args.seed)
    module.setup()
    history = fit(module, samples, epochs=args.epochs, global_batch_size=args.global_batch, drop_last=args.drop_last,
                  micro_batch_size=args.micro_batch, seed=args.seed, desc="sft")
    module.save_hf_checkpoint(args.save)
    if history:
        print(f"[sft] {len(history)} steps, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}; "
              f"saved {args.save}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser(__doc__.split("\n")[0], "JSON lines with prompt and response", epochs=3,
                           lr=1e-3).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch(_train, args.nproc, args)


if __name__ == "__main__":
    main()
