"""The embedded default: a real RLHF run on 2 CPU cores that visibly improves a model.

    python examples/megatron/main_tiny.py                       # PPO (RLHFEngine), 4.9 minutes on 2 cores (README)
    python examples/megatron/main_tiny.py --algo grpo           # GRPO on the rule reward
    python examples/megatron/main_tiny.py --algo rloo           # RLOO (leave-one-out baseline), the same
    python examples/megatron/main_tiny.py --algo reinforce_pp   # REINFORCE++ (one response per prompt)
    python examples/megatron/main_tiny.py --algo online_dpo
    python examples/megatron/main_tiny.py --algo grpo --policy-lag 1   # asynchronous: generation 1 episode ahead
    python examples/megatron/main_tiny.py --algo grpo --policy-lag 1 --policy-lag-mode streaming

Steps (each reuses its output when it exists, so a rerun resumes):
  1. build a tiny Llama-style model and a sentencepiece tokenizer locally (random init, no downloads);
  2. write the task: arithmetic prompts with known answers, split into training and held-out prompts;
  3. SFT warm start on Megatron (examples/megatron/train_sft.py);
  4. fit a reward model on (right answer, wrong answer) pairs (train_reward.py; PPO only);
  5. RL through the engine (train_rlhf.py / train_grpo.py / train_rloo.py / train_reinforce_pp.py /
     train_online_dpo.py with configs/tiny/<algo>.yaml): vLLM sampling, Megatron training, Ray,
     parameter sync every episode;
  6. print held-out reward and accuracy from before training to the end, and plot them (PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from arithmetic import make_arithmetic_examples, preference_records, sft_records  # noqa: E402

from chatlearn.data.prompts import read_jsonl, write_jsonl  # noqa: E402
from chatlearn.utils.memory import PeakRSSMonitor  # noqa: E402
from chatlearn.utils.metrics import read_metrics  # noqa: E402

ALGORITHMS = {
    "ppo": ("train_rlhf.py", "rlhf.yaml"),
    "grpo": ("train_grpo.py", "grpo.yaml"),
    "rloo": ("train_rloo.py", "rloo.yaml"),
    "reinforce_pp": ("train_reinforce_pp.py", "reinforce_pp.yaml"),
    "online_dpo": ("train_online_dpo.py", "online_dpo.yaml"),
}


# The policy trainer's model name in each config (its final weights: <run dir>/hf_<name>).
TRAINERS = {"ppo": "ppo_policy", **{algo: "policy_trainer" for algo in ALGORITHMS if algo != "ppo"}}


def _command_text(cmd: list[str], width: int = 100) -> str:
    """``cmd`` as a shell runs it, wrapped between options to fit a terminal."""
    words = [shlex.quote(os.path.relpath(c) if os.path.isabs(c) and c.startswith(os.getcwd()) else c) for c in cmd]
    groups: list[list[str]] = [words[:2]]  # the interpreter and the script, then each option with its value
    for word in words[2:]:
        if word.startswith("-"):
            groups.append([word])
        else:
            groups[-1].append(word)
    lines = [" ".join(groups[0])]
    for group in map(" ".join, groups[1:]):
        if len(lines[-1]) + 1 + len(group) > width:
            lines.append(group)
        else:
            lines[-1] += " " + group
    return " \\\n       ".join(lines)


def _log(message: str) -> None:
    print(f"[main] {message}", flush=True)


def _run(cmd: list[str], env: dict | None = None) -> None:
    _log(_command_text(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def _setup_task(out: str, args: argparse.Namespace) -> dict[str, str]:
    """Every distinct prompt, split into held-out prompts (never trained on) and training prompts."""
    paths = {name: os.path.join(out, "data", f"{name}.jsonl")
             for name in ("sft", "pairs", "rl", "heldout", "heldout_pairs")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    unique = {ex["prompt"]: ex for ex in make_arithmetic_examples(20 * (args.max_operand + 1) ** 2, seed=args.seed,
                                                                  max_operand=args.max_operand)}
    examples = sorted(unique.values(), key=lambda ex: ex["prompt"])
    random.Random(args.seed).shuffle(examples)
    heldout, train = examples[:args.heldout], examples[args.heldout:]
    write_jsonl(paths["heldout"], heldout)
    write_jsonl(paths["sft"], sft_records(train))
    write_jsonl(paths["pairs"], preference_records(train * 4, seed=args.seed + 1))
    write_jsonl(paths["rl"], train)
    write_jsonl(paths["heldout_pairs"], preference_records(heldout * 4, seed=args.seed + 2))
    _log(f"task: {len(train)} training prompts, {len(heldout)} held-out prompts under {out}/data")
    return paths


def _setup_models(out: str, paths: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    from chatlearn.utils.tiny_assets import ensure_tiny_assets

    assets = ensure_tiny_assets(os.path.join(out, "assets"), seed=args.seed, arch="llama")
    _log(f"tiny model and tokenizer: {assets.model_dir}")
    sft = os.path.join(out, "sft")
    if not os.path.exists(os.path.join(sft, "model.safetensors")):
        _run([sys.executable, os.path.join(HERE, "train_sft.py"), "--load", str(assets.model_dir),
              "--data", paths["sft"], "--save", sft, "--epochs", str(args.sft_epochs), "--lr", "3e-3",
              "--seed", str(args.seed), "--drop-last"])
    models = {"policy_load": sft}
    if args.algo == "ppo":
        reward = os.path.join(out, "reward_model")
        if not os.path.exists(os.path.join(reward, "model.safetensors")):
            _run([sys.executable, os.path.join(HERE, "train_reward.py"), "--load", sft, "--data", paths["pairs"],
                  "--eval-data", paths["heldout_pairs"], "--save", reward, "--epochs", str(args.reward_epochs),
                  "--seed", str(args.seed), "--drop-last"])
        models["reward_load"] = reward
    return models


def _plot(metrics: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [m for m in metrics if "eval/reward/mean" in m]
    train = [m for m in metrics if "reward/mean" in m and m["episode"] >= 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [m["episode"] + 1 for m in evals]
    axes[0].plot(x, [m["eval/reward/mean"] for m in evals], marker="o", label="held-out reward")
    axes[0].plot([m["episode"] + 1 for m in train], [m["reward/mean"] for m in train], alpha=0.5,
                 label="training reward (sampled)")
    axes[0].set_xlabel("episode (0 = before RL)")
    axes[0].legend()
    if evals and "eval/reward/fn" in evals[0]:
        axes[1].plot(x, [m["eval/reward/fn"] for m in evals], marker="o", color="C2")
        axes[1].set_ylabel("held-out accuracy (sampled)")
    axes[1].set_xlabel("episode (0 = before RL)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def greedy_accuracy(model_dir: str, examples: list[dict]) -> float:
    """Exact answers under greedy decoding with transformers (a check independent of the engine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from arithmetic import arithmetic_reward

    from chatlearn.models.vllm_module import eos_token_ids, fallback_pad_token_id

    hf_logging.disable_progress_bar()  # a bar per tiny checkpoint load would cut into the report
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Stop where the vLLM policy stops: on every EOS id of generation_config.json, not only the tokenizer's.
    eos = eos_token_ids(tokenizer, model.generation_config.to_dict())
    correct = 0.0
    for ex in examples:
        ids = torch.tensor([tokenizer(ex["prompt"]).input_ids])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                             pad_token_id=fallback_pad_token_id(tokenizer, eos))
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += arithmetic_reward({"response_text": text, "answer": ex["answer"]})
    return correct / len(examples)


def _report(run_dir: str, algo: str, elapsed: float, peak_gib: float, config: str, start_model: str,
            heldout: list[dict]) -> dict:
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = {m["episode"]: m for m in metrics if "eval/reward/mean" in m}
    print(f"\nheld-out prompts ({algo}): mean reward and accuracy of the evaluator's sampled responses "
          f"(eval_n per prompt at eval_temperature; see the policy's YAML)")
    print(f"{'episode':>8}  {'reward':>8}  {'accuracy':>8}  {'length':>6}")
    for episode, m in sorted(evals.items()):
        label = "start" if episode < 0 else str(episode + 1)
        print(f"{label:>8}  {m['eval/reward/mean']:>8.3f}  {m.get('eval/reward/fn', float('nan')):>8.3f}"
              f"  {m['eval/response_length/mean']:>6.2f}")
    first, last = evals[min(evals)], evals[max(evals)]
    last3 = [evals[e] for e in sorted(evals)[-3:]]
    final_model = os.path.join(run_dir, f"hf_{TRAINERS[algo]}")
    greedy = (greedy_accuracy(start_model, heldout), greedy_accuracy(final_model, heldout))
    plot = os.path.join(run_dir, "curves.png")
    _plot(metrics, plot, f"tiny {algo}: held-out reward and accuracy")
    summary = {
        "algorithm": algo,
        "episodes": max(m["episode"] for m in metrics) + 1,
        "heldout_reward_start": first["eval/reward/mean"], "heldout_reward_end": last["eval/reward/mean"],
        "heldout_accuracy_start": first.get("eval/reward/fn"), "heldout_accuracy_end": last.get("eval/reward/fn"),
        # The mean of the last three evaluations: steadier than the last one alone.
        "heldout_reward_last3": sum(m["eval/reward/mean"] for m in last3) / len(last3),
        "heldout_accuracy_last3": sum(m.get("eval/reward/fn", float("nan")) for m in last3) / len(last3),
        "heldout_greedy_accuracy_start": greedy[0], "heldout_greedy_accuracy_end": greedy[1],
        "minutes": elapsed / 60, "peak_rss_gib": peak_gib,
    }
    episodes = [m for m in metrics if m["episode"] >= 0 and "time/driver" in m]
    if episodes:  # the engine's driver: its share of the episodes' time (not waiting on workers), its peak
        summary["driver_share"] = sum(m["time/driver"] for m in episodes) / sum(m["time/episode"] for m in episodes)
        summary["driver_peak_rss_gib"] = max(m["driver/peak_rss_gib"] for m in episodes)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nheld-out reward {first['eval/reward/mean']:.3f} -> {last['eval/reward/mean']:.3f}, accuracy "
          f"{first.get('eval/reward/fn', float('nan')):.3f} -> {last.get('eval/reward/fn', float('nan')):.3f} "
          f"(sampled), greedy accuracy {greedy[0]:.3f} -> {greedy[1]:.3f}, over {summary['episodes']} episodes; "
          f"{elapsed / 60:.1f} min in all")
    print(f"metrics:      {run_dir}/metrics.jsonl (TensorBoard: {run_dir}/tensorboard)")
    print(f"plot:         {plot}")
    print(f"checkpoints:  {run_dir}/checkpoints (rerun the same command to resume from the last one)")
    print(f"final policy: {final_model} (Hugging Face format: transformers and vLLM load it)")
    print(f"config:       {config}")
    print(f"peak RSS:     {peak_gib:.2f} GiB (this process and all below it: Ray, vLLM, Megatron workers)")
    if "driver_share" in summary:
        print(f"driver:       {summary['driver_share']:.1%} of the episodes' time outside waits on workers, "
              f"peak RSS {summary['driver_peak_rss_gib']:.2f} GiB")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="ppo")
    parser.add_argument("--output-dir", default="output/tiny")
    parser.add_argument("--episodes", type=int, default=None, help="RL episodes (default: the config's)")
    parser.add_argument("--config", default=None,
                        help="the RL config (default: configs/tiny/<algo>.yaml; configs/tiny/rlhf_1gpu.yaml "
                             "puts the PPO roles on one GPU)")
    parser.add_argument("--max-operand", type=int, default=9, help="operands of the arithmetic task: 0..N")
    parser.add_argument("--heldout", type=int, default=24, help="prompts kept out of every training step")
    parser.add_argument("--sft-epochs", type=int, default=30,
                        help="a short warm start: the policy should know the format, not every answer")
    parser.add_argument("--reward-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-lag", type=int, default=0,
                        help="fixed-lag asynchronous training (runtime.policy_lag): episode t trains on rollouts "
                             "sampled K policy versions earlier, while the next generation runs")
    parser.add_argument("--policy-lag-mode", choices=("fixed", "streaming"), default="fixed",
                        help="runtime.policy_lag_mode: streaming hands episodes the oldest finished generation "
                             "batches, none more than --policy-lag versions old (docs/algorithms.md)")
    parser.add_argument("--verbose", action="store_true",
                        help="every metric on each episode's line and the dependencies' messages unfiltered "
                             "(runtime.debug)")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.output_dir)
    start = time.time()
    with PeakRSSMonitor() as memory:
        paths = _setup_task(out, args)
        knobs = _setup_models(out, paths, args)
        script, config_name = ALGORITHMS[args.algo]
        config = os.path.abspath(args.config) if args.config else os.path.join(HERE, "configs", "tiny", config_name)
        # A lagged run gets its own directory: it must not resume from a synchronous run's checkpoints.
        exp_name = args.algo if not args.policy_lag else f"{args.algo}_lag{args.policy_lag}"
        if args.policy_lag_mode == "streaming":
            exp_name += "_streaming"
        env = {**knobs, "data_path": paths["rl"], "eval_data_path": paths["heldout"], "output_dir": out,
               "exp_name": exp_name, "policy_lag": str(args.policy_lag), "policy_lag_mode": args.policy_lag_mode}
        if args.episodes is not None:
            env["num_episode"] = str(args.episodes)
        if args.verbose:
            env["debug"] = "True"
        _run([sys.executable, os.path.join(HERE, script), "-c", config], env=env)
    return _report(os.path.join(out, exp_name), args.algo, time.time() - start, memory.peak_gib, config,
                   knobs["policy_load"], read_jsonl(paths["heldout"]))


if __name__ == "__main__":
    main()
