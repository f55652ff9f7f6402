"""Asynchronous training on CPU: wall time per episode for policy_lag 0, 1 and 2 side by side.

    python benchmarks/async_cpu.py                    # 12 episodes per lag on the tiny GRPO main job
    python benchmarks/async_cpu.py --episodes 4       # a quick look
    python benchmarks/async_cpu.py --lags 0,1,1s      # "1s": policy_lag 1 with policy_lag_mode streaming

The tiny GRPO main job (``examples/megatron/main_tiny.py --algo grpo``, real vLLM and
Megatron on CPU) with the policy (vLLM) on one process and the trainer, reference and
reward on another, so generation and training can overlap; responses end at EOS, so
their lengths vary (the long tail async training is meant to hide). One warm start (the
SFT model) is shared by the runs. Per lag it reports the mean wall time per episode
(after the first, which includes warm-up), the generator's and the trainer's idle
fractions, the held-out accuracy at the end, and the speed-up over lag 0. Writes
``benchmarks/results/async_cpu.json`` and a RESULTS.md section.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "megatron"))

from benchmarks.results_md import command_line, machine_name, save_results, update_results_section  # noqa: E402

GRPO_YAML = os.path.join(ROOT, "examples", "megatron", "configs", "tiny", "grpo.yaml")


def split_placement_config(directory: str) -> str:
    """grpo.yaml with the policy alone on its process and the other three roles sharing one."""
    path = os.path.join(directory, "grpo_split.yaml")
    with open(path, "w") as f:
        # A model in no colocation group gets devices of its own: the policy here.
        f.write(f"includes:\n  - {GRPO_YAML}\nruntime:\n  colocation:\n    - policy_trainer,reference,reward\n")
    return path


def _share(value: float) -> str:
    return "n/a" if value != value else f"{value:.0%}"  # NaN: the metric exists only with a lag


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--lags", default="0,1,2")
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "chatlearn-async-cpu"))
    args = p.parse_args(argv)
    import main_tiny

    from chatlearn.utils.metrics import read_metrics

    config = split_placement_config(tempfile.mkdtemp())
    rows = {}
    for variant in args.lags.split(","):
        lag, streaming = int(variant.rstrip("s")), variant.endswith("s")
        summary = main_tiny.main(["--algo", "grpo", "--policy-lag", str(lag), "--episodes", str(args.episodes),
                                  "--output-dir", args.output_dir, "--config", config,
                                  "--policy-lag-mode", "streaming" if streaming else "fixed"])
        run = ("grpo" if lag == 0 else f"grpo_lag{lag}") + ("_streaming" if streaming else "")
        episodes = [m for m in read_metrics(os.path.join(args.output_dir, run, "metrics.jsonl"))
                    if m.get("episode", -1) >= 1]
        rows[f"{lag} (streaming)" if streaming else str(lag)] = {
            "episode_s": statistics.mean(m["time/episode"] for m in episodes),
            # One slow episode (e.g. the first generation after a checkpoint) moves the mean a lot.
            "episode_median_s": statistics.median(m["time/episode"] for m in episodes),
            "generator_idle": statistics.mean(m.get("async/generator_idle_fraction", float("nan")) for m in episodes),
            "trainer_idle": statistics.mean(m.get("async/trainer_idle_fraction", float("nan")) for m in episodes),
            "generate_s": statistics.mean(m.get("time/policy.forward_step", 0.0) for m in episodes),
            "train_s": statistics.mean(m.get("time/policy_trainer.train_step", 0.0) for m in episodes),
            "heldout_accuracy_last3": summary.get("heldout_accuracy_last3"),
        }
    base = rows[next(iter(rows))]["episode_s"]
    base_median = rows[next(iter(rows))]["episode_median_s"]
    table = ("| policy_lag | s per episode (mean) | speed-up | median | speed-up | generation s | training s "
             "| generator idle | trainer idle | held-out accuracy (last 3) |\n|---|---|---|---|---|---|---|---|---|---|\n"
             ) + "\n".join(
        f"| {lag} | {r['episode_s']:.2f} | {base / r['episode_s']:.2f}x | {r['episode_median_s']:.2f} "
        f"| {base_median / r['episode_median_s']:.2f}x | {r['generate_s']:.2f} | {r['train_s']:.2f} "
        f"| {_share(r['generator_idle'])} | {_share(r['trainer_idle'])} | {r['heldout_accuracy_last3']:.3f} |"
        for lag, r in rows.items())
    print(table, flush=True)
    machine = machine_name("cpu")
    save_results("async_cpu", {"machine": machine, "episodes": args.episodes, "rows": rows})
    update_results_section(
        "Asynchronous training on CPU (policy_lag)",
        f"Machine: {machine}. Command: `{command_line('async_cpu.py', argv)}`. The tiny GRPO main job, the policy "
        f"(vLLM) on one process and trainer, reference and reward on another; {args.episodes} episodes per lag, "
        f"mean and median of episodes 2-{args.episodes} (speed-ups over the first row); idle fractions are 1 - busy seconds / episode seconds (reported with a "
        f"lag only). Generation and training share the machine's cores, so the overlap is bounded by them.\n\n"
        f"{table}\n")
    return rows


if __name__ == "__main__":
    main()
