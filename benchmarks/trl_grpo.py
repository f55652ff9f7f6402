"""TRL's GRPOTrainer with colocated vLLM on one GPU: the other side of chatlearn's GRPO step time.

    python benchmarks/trl_grpo.py --model qwen2-0.5b --max-new-tokens 1024 --steps 3
    python benchmarks/trl_grpo.py --model qwen2-1.5b --max-new-tokens 256 --steps 4
    python benchmarks/trl_grpo.py --model qwen2-tiny --use-vllm false --prompts 2 --n 2 --max-new-tokens 8 \
        --micro-batch 2 --steps 2                       # CPU dry run: TRL generates with transformers

Needs trl 1.16.0, datasets 5.2.0, dill and multiprocess (wheels in .gpu/trl/, see its README). A
random-init Qwen2-shaped model (bf16 checkpoint) and a word-level tokenizer whose ids cover the
vocabulary are built locally (no downloads). Each step: ``--prompts`` synthetic prompts of
``--prompt-len`` tokens, ``--n`` samples each, exactly ``--max-new-tokens`` new tokens (vLLM
``ignore_eos``), temperature 1, a cheap rule reward (fraction of even token ids), then one optimizer
step over all prompts x n samples (micro-batches of ``--micro-batch``, gradient accumulation over
the rest). KL coefficient beta=0.04, so TRL loads a reference model; loss_type is TRL's default
("dapo"); AdamW at lr 1e-6; fp32 weights under bf16 autocast (``--weights bf16``: pure bf16);
gradient checkpointing off unless ``--gradient-checkpointing``.

TRL's colocate mode builds ``vllm.LLM`` itself with no way to add engine arguments; the vLLM wheel
of the lent GPUs has no FlashAttention, so the Triton backend is injected by wrapping the ``LLM``
class that TRL looks up (see ``inject_attention_backend``).

What else TRL does per step, with its defaults kept: a policy forward for the old log-probs
(``vllm_importance_sampling_correction``, sequence_mask, clip 3) and a reference forward (beta), both
in micro-batches, then forward/backward per micro-batch, grad-norm clip 1.0 and AdamW (fused,
constant lr). TRL builds the engine with ``max_num_batched_tokens=4096``, ``max_num_seqs`` = samples
per step and ``logprobs_mode="processed_logprobs"``; with sleep mode (default here) it sleeps at
level 2 after each generation and re-pushes the weights from the training model before the next.

Per step: wall time (a callback, CUDA-synchronised), TRL's own profiling timings (vLLM.generate and
sync_weights are synchronous; the log-prob passes and compute_loss are host-side times), generated
tokens/s, peak torch-allocated GPU memory. The first step is reported apart as warm-up. Writes
``$OUT/trl_grpo_<model>_<tokens>.json`` when $OUT is set, else ``benchmarks/results/`` (same name).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.param_sync import SHAPES, build_model  # noqa: E402
from benchmarks.results_md import command_line, machine_name, save_results  # noqa: E402

BETA = 0.04
FIRST_WORD = 4  # ids 0-3: <unk> <s> </s> <pad>
# The shapes e2e_gpu.py runs (benchmarks.param_sync.SHAPES), built by the same code.
MODELS = ("qwen2-0.5b", "qwen2-1.5b", "qwen2-tiny")


def inject_attention_backend(backend: str, engine_args: dict[str, Any]) -> None:
    """Make TRL's colocated ``LLM(...)`` use ``attention_config={"backend": backend}``.

    trl 1.16.0, trl/generation/vllm_generation.py:43 ``from vllm import LLM, RequestOutput, SamplingParams``
    and :347 ``self.llm = LLM(model=model.name_or_path, ..., distributed_executor_backend="external_launcher",
    ...)`` in ``VLLMGeneration._init_vllm``: the name ``LLM`` is looked up in that module when the trainer is
    built, so replacing the module attribute with a subclass is enough. The keyword arguments TRL passes
    are recorded in ``engine_args``."""
    import trl.generation.vllm_generation as trl_vllm

    base = trl_vllm.LLM

    class PatchedLLM(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if backend:
                kwargs.setdefault("attention_config", {"backend": backend})
            engine_args.update({k: v if isinstance(v, (int, float, str, bool, dict, type(None))) else repr(v)
                                for k, v in kwargs.items()})
            print(f"TRL builds vllm.LLM({', '.join(f'{k}={v!r}' for k, v in engine_args.items())})", flush=True)
            super().__init__(*args, **kwargs)

    trl_vllm.LLM = PatchedLLM


def record_profiling(store: dict[int, dict[str, float]], trainer_ref: list) -> None:
    """TRL times its phases with ``ProfilingContext`` but only reports them to wandb/mlflow/trackio:
    add each duration to ``store[global_step][name]`` as well."""
    from trl.extras import profiling

    original = profiling.ProfilingContext._log_metrics

    def _log_metrics(self, duration: float) -> None:
        step = trainer_ref[0].state.global_step if trainer_ref else -1
        store[step][self.name] = store[step].get(self.name, 0.0) + duration
        original(self, duration)

    profiling.ProfilingContext._log_metrics = _log_metrics


def even_token_reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
    """Rule reward: the fraction of even token ids in the completion."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="qwen2-0.5b", help="qwen2-tiny: a CPU dry run")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is warm-up")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (num_generations)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward "
                   "(per_device_train_batch_size); gradient_accumulation_steps = prompts * n / micro-batch")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32",
                   help="training weights and Adam states: fp32 with bf16 autocast (TRL's default when it "
                        "loads a path) or pure bf16")
    p.add_argument("--use-vllm", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--no-vllm-sleep", dest="vllm_sleep", action="store_false",
                   help="keep vLLM's weights and KV cache on the GPU during training (default: sleep mode)")
    p.add_argument("--attention-backend", default=None,
                   help="vLLM attention backend injected into TRL's LLM (default: TRITON_ATTN on GPU)")
    p.add_argument("--work", default="/tmp/chatlearn-e2e", help="shared with e2e_gpu.py: the model is built once")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    samples = args.prompts * args.n
    if samples % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide prompts x n = {samples}")
    if gpu:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    backend = args.attention_backend if args.attention_backend is not None else ("TRITON_ATTN" if gpu else "")

    import datasets
    import transformers
    import trl
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    t_imported = time.perf_counter()
    model_dir = build_model(Path(args.work), args.model, torch.bfloat16)
    t_built = time.perf_counter()
    vocab = SHAPES[args.model]["vocab"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST_WORD, vocab, (args.prompts * args.steps, args.prompt_len), generator=gen).tolist()
    dataset = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in row) for row in ids]})

    engine_args: dict[str, Any] = {}
    profile: dict[int, dict[str, float]] = defaultdict(dict)
    trainer_ref: list = []
    if args.use_vllm:
        inject_attention_backend(backend, engine_args)
    record_profiling(profile, trainer_ref)
    config = GRPOConfig(
        output_dir=os.path.join(args.work, "out"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, max_steps=args.steps, learning_rate=1e-6, lr_scheduler_type="constant",
        bf16=gpu, use_cpu=not gpu,
        model_init_kwargs={"dtype": "float32" if args.weights == "fp32" else "bfloat16"},
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=samples // args.micro_batch,
        num_generations=args.n, max_completion_length=args.max_new_tokens, temperature=1.0, num_iterations=1,
        beta=BETA, gradient_checkpointing=args.gradient_checkpointing,
        # ignore_eos goes to vLLM's SamplingParams; transformers' generate gets min_new_tokens instead.
        generation_kwargs={"ignore_eos": True} if args.use_vllm else {"min_new_tokens": args.max_new_tokens},
        use_vllm=args.use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_enable_sleep_mode=args.vllm_sleep and gpu and args.use_vllm,
        vllm_max_model_length=args.prompt_len + args.max_new_tokens,
    )
    steps: list[dict[str, Any]] = []
    first_begin: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            steps.append({"step": state.global_step, "begin": time.perf_counter()})
            first_begin.append(steps[-1]["begin"])

        def on_step_end(self, targs, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            rec = steps[-1]
            rec["wall_s"] = time.perf_counter() - rec.pop("begin")
            if gpu:
                free, total = torch.cuda.mem_get_info()
                rec.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                           peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                           device_used_at_end_gib=(total - free) / 2**30)

        def on_log(self, targs, state, control, logs=None, **kw):
            if steps and logs and "train_runtime" not in logs:
                steps[-1].setdefault("trl_logs", {}).update(logs)

    t_trainer = time.perf_counter()
    # transformers 5's AutoTokenizer maps model_type qwen2 to Qwen2Tokenizer, which drops the word-level model.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir), padding_side="left", truncation_side="left")
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=even_token_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer_ref.append(trainer)
    t_trained = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()

    for i, rec in enumerate(steps):
        rec["trl_profile_s"] = profile.get(i, {})
        logs = rec.get("trl_logs", {})
        tokens = logs.get("completions/mean_length", args.max_new_tokens) * samples
        gen_s = next((v for k, v in rec["trl_profile_s"].items() if k.endswith(".generate")), None)
        rec.update(generated_tokens=tokens, step_tok_s=tokens / rec["wall_s"], generate_s=gen_s,
                   generate_tok_s=tokens / gen_s if gen_s else None,
                   other_s=rec["wall_s"] - gen_s if gen_s else None)
    timed = steps[1:] or steps  # the first step (compilation, CUDA graphs, allocator) is warm-up
    summary: dict[str, Any] = {}
    for key in ("wall_s", "generate_s", "other_s", "generate_tok_s", "step_tok_s"):
        values = [r[key] for r in timed if r.get(key) is not None]
        summary[key] = statistics.mean(values) if values else None
    summary["peak_allocated_gib"] = max((r["peak_allocated_gib"] for r in steps if "peak_allocated_gib" in r),
                                        default=None)
    startup = {"imports_s": t_imported - T0, "model_build_s": t_built - t_imported,
               "trainer_construction_s": t_trained - t_trainer, "to_first_step_s": first_begin[0] - T0,
               "train_total_s": t_end - t_trained}
    rows = [f"| {r['step'] + 1}{' (warm-up)' if i == 0 and len(steps) > 1 else ''} | {r['wall_s']:.2f} | "
            f"{r['generate_s'] or float('nan'):.2f} | {r['other_s'] or float('nan'):.2f} | "
            f"{r['generate_tok_s'] or float('nan'):,.0f} | {r['step_tok_s']:,.0f} | "
            f"{r.get('peak_allocated_gib', float('nan')):.1f} |" for i, r in enumerate(steps)]
    table = ("| step | wall s | generate s | rest s | generated tok/s | step tok/s | peak alloc GiB |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(table)
    print(f"mean over steps 2..{len(steps)}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if v is not None))
    print("start-up: " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))
    machine = machine_name("gpu" if gpu else "cpu")
    result = dict(
        benchmark="trl_grpo", command=command_line("trl_grpo.py", argv), machine=machine, model=args.model,
        shape=SHAPES[args.model], versions={m.__name__: m.__version__ for m in (trl, transformers, datasets, torch)},
        settings=dict(prompts=args.prompts, n=args.n, samples_per_step=samples, prompt_len=args.prompt_len,
                      max_new_tokens=args.max_new_tokens, fixed_length=config.generation_kwargs, temperature=1.0,
                      beta=BETA, loss_type=config.loss_type, epsilon=config.epsilon, scale_rewards=config.scale_rewards,
                      num_iterations=1, micro_batch=args.micro_batch,
                      gradient_accumulation_steps=config.gradient_accumulation_steps,
                      gradient_checkpointing=args.gradient_checkpointing, weights=args.weights, bf16=config.bf16,
                      optimizer=getattr(config.optim, "value", config.optim), learning_rate=config.learning_rate,
                      lr_scheduler=getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type),
                      adam_betas=(config.adam_beta1, config.adam_beta2), adam_epsilon=config.adam_epsilon,
                      weight_decay=config.weight_decay,
                      max_grad_norm=config.max_grad_norm, use_vllm=args.use_vllm, vllm_mode="colocate",
                      vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                      vllm_sleep_mode=config.vllm_enable_sleep_mode,
                      vllm_importance_sampling_correction=config.vllm_importance_sampling_correction,
                      mask_truncated_completions=config.mask_truncated_completions, attention_backend=backend),
        vllm_engine_args=engine_args, startup_s=startup, steps=steps, summary_excluding_warmup=summary)
    if args.use_vllm:
        import vllm

        result["versions"]["vllm"] = vllm.__version__
    name = f"trl_grpo_{args.model}_{args.max_new_tokens}"
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], f"{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=str)
    else:
        path = save_results(name, json.loads(json.dumps(result, default=str)))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
