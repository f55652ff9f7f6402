"""End-to-end GRPO steps through the engine on one GPU, every role colocated, with the step split up.

    python benchmarks/e2e_gpu.py --model qwen2-0.5b --new-tokens 1024      # 64 prompts x 8 x 1024
    python benchmarks/e2e_gpu.py --model qwen2-0.5b --new-tokens 256
    python benchmarks/e2e_gpu.py --model qwen2-1.5b --new-tokens 1024
    python benchmarks/e2e_gpu.py --device cpu --quick                      # tiny model, to try it out
    # two GPUs, responses of varying length (64 stop ids): every role on both GPUs, synchronous ...
    python benchmarks/e2e_gpu.py --gpus 2 --layout colocated --new-tokens 512 --stop-ids 64 --steps 6 --lr 1e-5
    # ... against vLLM on one GPU and the trainer on the other, one episode apart (NCCL weight sync)
    python benchmarks/e2e_gpu.py --gpus 2 --layout split --policy-lag 1 --new-tokens 512 --stop-ids 64 --steps 6 --lr 1e-5

One real run of ``examples/megatron/train_grpo.py`` (a subprocess, as a user runs it)
on a random-init Qwen2 shape with a word-level tokenizer covering the whole vocabulary
(built locally, no downloads; ``benchmarks/param_sync.build_model``). Each step
(episode): ``--prompts`` prompts of ``--prompt-len`` tokens, ``--n`` responses each of
exactly ``--new-tokens`` tokens (``ignore_eos``, temperature 1), a cheap rule reward
(``even_words_reward``), reference log-probs, old log-probs by the trainer
(``--recompute-old-logprobs``; with one optimizer step per episode the engine takes them
from the training pass, no separate pass), one optimizer step over all samples (Adam,
lr 1e-6, KL coefficient 0.04, token-mean loss, training micro-batches of ``--micro-batch``,
forward-only passes in micro-batches of ``--forward-micro-batch``) and the weight sync
into vLLM. These match ``benchmarks/trl_grpo.py``, TRL's GRPOTrainer on the same work.
Policy (vLLM), reference, reward and trainer share the GPU with ``free_memory``: the
trainer waits in host memory while vLLM samples and vLLM sleeps while it trains.

With ``--gpus N``: ``--layout colocated`` puts every role on all N GPUs (N vLLM replicas,
the trainer data-parallel over N, ``free_memory``); ``--layout split`` gives vLLM one GPU of
its own and the other roles the other N-1 (no ``free_memory``; the weights travel by NCCL),
usually with ``--policy-lag 1`` so that generation and training overlap. ``--stop-ids K``
makes K random token ids end a response, so lengths vary (about ``vocab/K`` tokens on
average, at most ``--new-tokens``) as they do in real RL; the tables then count the tokens
actually generated.

Per step it reports the wall time split into generation, reference and old log-probs,
reward, training, sync and the rest (driver, offload/onload, idle); generated tokens/s;
training MFU (model FLOPs of the trained tokens over the train step and the bf16 matmul
peak measured on the same GPU); the GPU's peak memory in use (``nvidia-smi``, all
processes) and the driver's peak RSS; and start-up: process start to the first episode,
with the engine's own parts (``startup/*``). The first step is warm-up: reported, not
averaged. Writes ``benchmarks/results/e2e_gpu_<model>_<tokens>.json`` and a RESULTS.md
section.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results_md import command_line, machine_name, save_results, update_results_section  # noqa: E402

KL_COEF = 0.04
LR = 1e-6


def even_words_reward(sample: dict) -> float:
    """The share of response words whose token id is even (word ``w<id>`` is token ``id``): cheap, and varies."""
    ids = [int(i) for i in re.findall(r"w(\d+)", sample["response_text"])]
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


def devices(args: argparse.Namespace) -> dict[str, int]:
    """Devices of each role: vLLM on one of its own with ``--layout split`` (the trainer and
    reference on the rest), else every role on all of them. Inference roles run TP 1, so this
    is also their number of replicas."""
    split = args.layout == "split"
    rest = args.gpus - 1 if split else args.gpus
    return {"policy": 1 if split else args.gpus, "reference": rest, "reward": 1, "policy_trainer": rest}


def write_run_files(work: Path, model_dir: str, args: argparse.Namespace, vocab: int, gpu: bool) -> Path:
    """The prompts and the YAML files of the run; returns the main YAML."""
    rng = random.Random(0)
    data = work / "prompts.jsonl"
    with open(data, "w") as f:
        for _ in range(args.prompts * args.steps):
            # Token ids, not text: transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer,
            # which does not read the word-level tokenizer.json (it encodes "w12 w34" as nothing).
            ids = [rng.randrange(4, vocab) for _ in range(args.prompt_len)]
            f.write(json.dumps({"prompt_ids": ids}) + "\n")
    common = dict(seed=42, pad_token_id=3)
    policy = dict(common, load=model_dir, n=args.n, temperature=1.0, top_p=1.0, top_k=-1, ignore_eos=True,
                  new_token_limit=True, max_new_tokens=args.new_tokens,
                  max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=args.prompts * args.n)
    if args.enforce_eager:
        policy["enforce_eager"] = True
    if args.stop_ids:
        policy["stop_token_ids"] = sorted(random.Random(1).sample(range(4, vocab), args.stop_ids))
    if gpu:
        # The stripped vLLM wheel of the lent machines has no FlashAttention (PLATFORM.md).
        policy.update(gpu_memory_utilization=args.gpu_memory_utilization, attention_backend="TRITON_ATTN")
    megatron = dict(common, load=model_dir, forward_micro_batch_size=args.forward_micro_batch)
    # token-mean: every response token of the global batch weighs the same (TRL's default "dapo" loss).
    trainer = dict(megatron, optimizer="adam", lr=args.lr, clip_grad=1.0, kl_coef=KL_COEF, clip_eps=0.2,
                   loss_agg_mode="token-mean", recompute_old_logprobs=args.recompute_old_logprobs)
    if args.recompute:
        trainer.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    reward = dict(common, reward_fn="benchmarks.e2e_gpu:even_words_reward", fn_weight=1.0, model_weight=0.0)
    split = args.layout == "split"
    key = "num_gpu" if gpu else "num_cpu"
    count = devices(args)
    offload = gpu and not split  # colocated with vLLM: take turns on the GPUs
    models = {
        "policy": dict(model_config_file="policy.yaml", trainable=False, free_memory=offload),
        "reference": dict(model_config_file="reference.yaml", trainable=False, free_memory=offload),
        "reward": dict(model_config_file="reward.yaml", trainable=False),
        "policy_trainer": dict(model_config_file="trainer.yaml", trainable=True, free_memory=offload),
    }
    for name, entry in models.items():
        entry[key] = count[name]
    colocated = [name for name in models if not (split and name == "policy")]
    samples = args.prompts * args.n
    # One generation batch per vLLM replica, so that every replica samples.
    replicas = count["policy"]
    main = dict(
        runtime_env=dict(platform="local", env_vars={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                                     "VLLM_USE_FLASHINFER_SAMPLER": "0",
                                                     "CUDA_DEVICE_MAX_CONNECTIONS": "1"}),
        models=models,
        runtime=dict(colocation=[",".join(colocated)] if gpu else ["policy,policy_trainer", "reference,reward"],
                     num_episode=args.steps, sample_per_episode=args.prompts, num_training_epoch=1,
                     generation_batch_size=args.prompts // replicas, train_micro_batch_size=args.micro_batch,
                     policy_lag=args.policy_lag, policy_lag_mode=args.policy_lag_mode,
                     train_global_batch_size=samples, stream_data_loader_type="dynamic", data_path=str(data),
                     output_dir=str(work / "output"), exp_name="e2e", save_episode_interval=0,
                     eval_episode_interval=0, enable_resume_training=False, seed=42, actor_timeout_s=1800),
    )
    import yaml

    for name, content in (("policy.yaml", policy), ("reference.yaml", megatron), ("reward.yaml", reward),
                          ("trainer.yaml", trainer), ("e2e.yaml", main)):
        (work / name).write_text(yaml.safe_dump(content, sort_keys=False))
    return work / "e2e.yaml"


class GpuMemoryPeak:
    """The largest ``memory.used`` nvidia-smi reports while running (all processes), MiB: on
    any GPU (``peak_mib``) and per GPU (``per_gpu_mib``)."""

    def __init__(self, interval_s: float = 0.5):
        self.peak_mib, self.per_gpu_mib, self._stop = 0.0, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for i, line in enumerate(out.strip().splitlines()):
                    self.per_gpu_mib[i] = max(self.per_gpu_mib.get(i, 0.0), float(line))
                self.peak_mib = max(self.per_gpu_mib.values(), default=0.0)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> "GpuMemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_engine(config: Path, log_path: Path, gpu: bool) -> tuple[float, Optional[float], dict[int, float]]:
    """Run the GRPO recipe on ``config``; ``(seconds, seconds to the end of start-up, peak MiB per GPU)``.
    The run's output goes to ``log_path``; a failed run raises with its last lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, os.path.join(ROOT, "examples/megatron/train_grpo.py"), "-c", str(config)]
    setup_done = None
    start = time.perf_counter()
    with GpuMemoryPeak() if gpu else _NoPeak() as peak, open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if setup_done is None and "start-up took" in line:
                setup_done = time.perf_counter() - start
            if "episode" in line and ("/" in line or "done" in line):
                print(line.rstrip()[-160:], flush=True)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code:
        tail = "".join(open(log_path).readlines()[-40:])
        raise RuntimeError(f"the engine run failed ({code}); log {log_path}:\n{tail}")
    return seconds, setup_done, dict(peak.per_gpu_mib)


class _NoPeak:
    peak_mib = 0.0
    per_gpu_mib: dict = {}

    def __enter__(self) -> "_NoPeak":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def response_length(record: dict, new_tokens: int) -> float:
    """The episode's mean response length (its rollout metric; ``new_tokens`` if it has none)."""
    return float(next((v for k, v in record.items() if k.endswith("response_length/mean")), new_tokens))


def step_breakdown(record: dict, samples: int, new_tokens: int, prompt_len: int, flops_per_token: Callable,
                   peak_tflops: Optional[float], replicas: Optional[dict[str, int]] = None) -> dict[str, float]:
    """One episode's parts (seconds) and rates from its metrics record. ``flops_per_token(seq)``:
    the model's training FLOPs per token at sequence length ``seq``. The engine sums a method's
    seconds over replicas; ``replicas`` (policy, reference) turns those into seconds per replica,
    the wall time of a part when the replicas work side by side."""
    t = {k[len("time/"):]: v for k, v in record.items() if k.startswith("time/")}
    replicas = replicas or {}
    parts = {
        "generation": t.get("policy.forward_step", 0.0) / replicas.get("policy", 1),
        "reference": t.get("reference.forward_step", 0.0) / replicas.get("reference", 1),
        "old_logprobs": t.get("policy_trainer.forward_step", 0.0),
        "reward": t.get("reward.forward_step", 0.0),
        "training": t.get("policy_trainer.train_step", 0.0),
        "sync": t.get("sync", 0.0),
    }
    step = t["episode"]
    length = response_length(record, new_tokens)
    out = dict(step_s=step, **{f"{k}_s": v for k, v in parts.items()}, rest_s=step - sum(parts.values()))
    out["response_length"] = length
    out["reward"] = float(record.get("reward/mean", float("nan")))
    out["generated_tok_s"] = samples * length / parts["generation"] if parts["generation"] else float("nan")
    if peak_tflops and parts["training"]:
        seq = prompt_len + length
        out["train_mfu"] = flops_per_token(seq) * samples * seq / parts["training"] / (peak_tflops * 1e12)
    out["driver_s"] = record.get("time/driver", float("nan"))  # part of rest_s: the driver's own work
    out["driver_peak_rss_gib"] = record.get("driver/peak_rss_gib", float("nan"))
    return out


def layout_words(args: argparse.Namespace) -> str:
    lag = f", policy lag {args.policy_lag} ({args.policy_lag_mode})" if args.policy_lag else ", synchronous"
    if args.layout == "split":
        return f"vLLM on 1 GPU of its own, the other roles on {args.gpus - 1}{lag}"
    if args.gpus == 1:
        return f"every role on the one device{lag}"
    return f"every role on all {args.gpus} GPUs ({args.gpus} vLLM replicas, trainer DP{args.gpus}){lag}"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    p.add_argument("--quick", action="store_true", help="a tiny Qwen2 shape and a small batch (to try it out)")
    p.add_argument("--model", choices=("qwen2-0.5b", "qwen2-1.5b"), default="qwen2-0.5b")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="episodes; the first is warm-up")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per training micro-batch")
    p.add_argument("--forward-micro-batch", type=int, default=32,
                   help="sequences per micro-batch of the forward-only passes (reference, old log-probs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU")
    p.add_argument("--recompute-old-logprobs", default=None, choices=("true", "false", "auto"),
                   help="default: true (auto with --policy-lag, where the sampler's log-probs are the old ones)")
    p.add_argument("--recompute", action="store_true", help="full activation recompute in training")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the run")
    p.add_argument("--layout", choices=("colocated", "split"), default="colocated",
                   help="every role on every GPU (colocated), or vLLM on a GPU of its own (split)")
    p.add_argument("--policy-lag", type=int, default=0, help="runtime.policy_lag (asynchronous training)")
    p.add_argument("--policy-lag-mode", choices=("fixed", "streaming"), default="fixed")
    p.add_argument("--stop-ids", type=int, default=0,
                   help="this many random token ids end a response (varying lengths); 0: every response is full")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without compile and CUDA graphs (starts sooner)")
    p.add_argument("--work", default="/tmp/chatlearn-e2e")
    args = p.parse_args(argv)
    if args.layout == "split" and args.gpus < 2:
        p.error("--layout split needs --gpus 2 or more (vLLM gets one of its own)")
    if args.recompute_old_logprobs is None:
        args.recompute_old_logprobs = "auto" if args.policy_lag else "true"
    if args.recompute_old_logprobs != "auto":
        args.recompute_old_logprobs = args.recompute_old_logprobs == "true"
    gpu = args.device == "gpu"
    model = "qwen2-tiny" if args.quick else args.model
    if args.quick:
        args.prompts, args.n, args.new_tokens, args.prompt_len = min(args.prompts, 4), min(args.n, 4), \
            min(args.new_tokens, 16), min(args.prompt_len, 16)
        args.micro_batch, args.forward_micro_batch = min(args.micro_batch, 8), min(args.forward_micro_batch, 8)

    from benchmarks.megatron_train import bf16_matmul_peak_tflops, model_flops_per_token
    from benchmarks.param_sync import build_model

    work = Path(args.work) / f"{model}_{args.new_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = str(build_model(Path(args.work), model, torch.bfloat16 if gpu else torch.float32))
    hf_config = json.loads((Path(model_dir) / "config.json").read_text())
    config = write_run_files(work, model_dir, args, hf_config["vocab_size"], gpu)
    peak_tflops = bf16_matmul_peak_tflops() if gpu else None
    if gpu:
        torch.cuda.empty_cache()

    metrics_file = work / "output" / "e2e" / "metrics.jsonl"
    if metrics_file.exists():
        metrics_file.unlink()
    seconds, setup_done_s, per_gpu_mib = run_engine(config, work / "run.log", gpu)
    peak_mib = max(per_gpu_mib.values(), default=0.0)
    from chatlearn.utils.metrics import read_metrics

    records = [r for r in read_metrics(str(metrics_file)) if r.get("episode", -1) >= 0]
    samples = args.prompts * args.n
    steps = [step_breakdown(r, samples, args.new_tokens, args.prompt_len,
                            lambda n: model_flops_per_token(hf_config, n), peak_tflops, devices(args))
             for r in records]
    startup = {k: v for k, v in records[0].items() if k.startswith("startup/")} if records else {}
    # The last policy_lag episodes of a lagged run train on rollouts sampled earlier and generate
    # nothing: a long run has almost none of them, so they are left out of the means.
    measured = [s for s in steps[1:] if s["generation_s"] > 0 or not args.policy_lag] or steps[1:] or steps
    # (nan-free: a lagged step may have no generation of its own to rate)
    mean = {k: statistics.mean([s[k] for s in measured if s[k] == s[k]] or [float("nan")]) for k in measured[0]}

    rows = [("step (wall)", "step_s"), ("generation (per replica)", "generation_s"),
            ("reference log-probs (per replica)", "reference_s"),
            ("old log-probs", "old_logprobs_s"), ("reward", "reward_s"), ("training", "training_s"),
            ("sync", "sync_s"), ("rest (driver, offload, idle; negative: parts overlapped)", "rest_s"),
            ("of which the driver", "driver_s")]
    table = "| part | seconds per step | share |\n|---|---|---|\n" + "\n".join(
        f"| {label} | {mean[key]:.2f} | {mean[key] / mean['step_s']:.0%} |" for label, key in rows)
    extra = [f"generated tokens/s: {mean['generated_tok_s']:,.0f}"]
    if "train_mfu" in mean:
        extra.append(f"training MFU: {mean['train_mfu']:.1%} of {peak_tflops:.0f} TFLOP/s measured bf16 peak")
    if gpu:
        extra.append("peak GPU memory in use: " + ", ".join(f"GPU {i} {m / 1024:.1f} GiB"
                                                            for i, m in sorted(per_gpu_mib.items())))
    extra.append(f"driver peak RSS: {mean['driver_peak_rss_gib']:.2f} GiB")
    if setup_done_s is not None:
        extra.append(f"start-up: process start to first episode {setup_done_s:.1f} s (" + ", ".join(
            f"{k[len('startup/'):-2]} {v:.1f}" for k, v in startup.items()) + ")")
    extra.append(f"warm-up step: {steps[0]['step_s']:.1f} s; whole run {seconds:.0f} s")
    extra.append(f"steps per hour: {3600 / mean['step_s']:.0f}")
    extra.append(f"mean response length {mean['response_length']:.0f} tokens")
    extra.append("reward/mean per step: " + ", ".join(f"{s['reward']:.4f}" for s in steps))
    print(table + "\n\n" + "\n".join(extra), flush=True)

    machine = machine_name(args.device)
    tag = f"{args.device}_{model}_{args.new_tokens}"
    if args.gpus > 1 or args.policy_lag or args.stop_ids:
        tag += f"_{args.gpus}gpu_{args.layout}_lag{args.policy_lag}" + (f"_stop{args.stop_ids}" if args.stop_ids else "")
    result = dict(model=model, device=args.device, machine=machine, prompts=args.prompts, n=args.n,
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, micro_batch=args.micro_batch,
                  forward_micro_batch=args.forward_micro_batch,
                  recompute_old_logprobs=args.recompute_old_logprobs, activation_recompute=args.recompute,
                  kl_coef=KL_COEF, lr=args.lr, gpus=args.gpus, layout=args.layout, policy_lag=args.policy_lag,
                  policy_lag_mode=args.policy_lag_mode, stop_ids=args.stop_ids, peak_tflops=peak_tflops, peak_gpu_mib=peak_mib,
                  peak_gpu_mib_per_gpu=per_gpu_mib, run_s=seconds,
                  startup_to_first_episode_s=setup_done_s, startup_parts=startup, steps=steps, mean=mean)
    save_results(f"e2e_gpu_{tag}", result)
    cmd = command_line("e2e_gpu.py", argv)
    update_results_section(
        f"End-to-end GRPO step ({tag})",
        f"Machine: {machine}. Command: `{cmd}`. {model} shape (random init, bf16 on GPU), {args.prompts} prompts "
        f"of {args.prompt_len} tokens x {args.n} responses x "
        + (f"up to {args.new_tokens} new tokens ({args.stop_ids} random stop ids), " if args.stop_ids
           else f"{args.new_tokens} new tokens (ignore EOS), ")
        + f"temperature 1, KL coefficient {KL_COEF}, lr {args.lr:g}, old log-probs recomputed: "
        f"{args.recompute_old_logprobs}, micro-batches of {args.micro_batch} (forward-only: "
        f"{args.forward_micro_batch}), {layout_words(args)}"
        + (", vLLM eager (no CUDA graphs)" if args.enforce_eager else "")
        + f"; mean of {len(measured)} steps after the first (warm-up).\n\n"
        f"{table}\n\n" + "; ".join(extra) + ".\n")
    return result


if __name__ == "__main__":
    main()
