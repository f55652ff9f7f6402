"""Build a megatron-core GPTModel shaped like a Hugging Face Llama / Qwen2 / Qwen3 checkpoint.

:func:`hf_arch` reads every field of ``config.json`` that changes the numbers
and refuses, naming the field, what megatron-core cannot express, so that a
model either matches transformers and vLLM or does not start.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from chatlearn.models.megatron import cpu_compat
from chatlearn.utils import platform


@dataclass(frozen=True)
class Family:
    """What a HF ``model_type`` adds to the common decoder: pre-norm RMSNorm, SwiGLU MLP,
    RoPE (rotate_half) and grouped-query attention."""

    qkv_bias: bool            # q/k/v biases always present (Qwen2)
    qk_norm: bool             # per-head RMSNorm on q and k before RoPE (Qwen3)
    attention_bias_key: str   # config key that adds biases to q/k/v and o_proj ("" if none)
    mlp_bias_key: str         # config key that adds biases to gate/up/down ("" if none)
    # vLLM's Qwen2 derives head_dim from hidden_size / num_attention_heads and ignores the key.
    head_dim_key: bool = True


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=False, qk_norm=False, attention_bias_key="attention_bias", mlp_bias_key="mlp_bias"),
    "qwen2": Family(qkv_bias=True, qk_norm=False, attention_bias_key="", mlp_bias_key="", head_dim_key=False),
    "qwen3": Family(qkv_bias=False, qk_norm=True, attention_bias_key="attention_bias", mlp_bias_key=""),
}

# megatron-core's llama3 RoPE scaling takes only the factor; these three are fixed
# in RotaryEmbedding._apply_scaling (0.16), so a checkpoint must use the same values.
MEGATRON_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
# Keys of a rope_scaling / rope_parameters section, per rope_type, that we map to megatron-core.
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", *MEGATRON_LLAMA3_FIXED),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
}
_ROPE_ALWAYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeScaling:
    """The checkpoint's RoPE scaling (``rope_type`` default: none)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0   # yarn
    beta_fast: float = 32.0                     # yarn
    beta_slow: float = 1.0                      # yarn
    mscale: Optional[float] = None              # yarn: used only when both mscale values are set
    mscale_all_dim: Optional[float] = None
    truncate: bool = True                       # yarn: round the correction range to integers


@dataclass(frozen=True)
class HFArch:
    """The parts of a HF config that decide the Megatron model's shape and numbers."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    # 0: a causal LM (lm_head over the vocabulary). > 0: a scalar head
    # (reward / value model, HF *ForSequenceClassification: ``score.weight``).
    num_labels: int = 0
    # Fields added after checkpoints were first written carry defaults, so that
    # an older checkpoint's metadata compares equal (dist_ckpt.check_checkpoint).
    qk_norm: bool = False
    # Biases on o_proj and the MLP (megatron-core: add_bias_linear, all or none).
    linear_bias: bool = False
    rope: RopeScaling = field(default_factory=RopeScaling)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def load_hf_config(model_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read ``config.json`` of a HF checkpoint dir, with errors that name the path.

    The config is checked with :func:`hf_arch` here, so an architecture this
    backend cannot reproduce is refused with the file named.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"HF checkpoint directory not found: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in HF checkpoint directory {model_dir}")
    with open(path) as f:
        cfg = json.load(f)
    try:
        hf_arch(cfg)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return cfg


def _rope_scaling(cfg: dict[str, Any]) -> tuple[RopeScaling, float]:
    """(scaling, rope_theta) from either spelling: transformers 4's ``rope_scaling`` plus a
    top-level ``rope_theta``, or transformers 5's ``rope_parameters`` holding both. Where a
    config has both, ``rope_scaling``'s keys win, as transformers 5 merges them."""
    section = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"

    def refuse(what: str) -> ValueError:
        return ValueError(f"{section}: {what}")

    if rope_type == "dynamic":
        raise refuse("rope_type 'dynamic' (dynamic NTK) is not supported: it rescales the frequencies with "
                     "the length of each input at inference, which megatron-core's RoPE cannot express")
    if rope_type not in ROPE_KEYS:
        raise refuse(f"rope_type {rope_type!r} is not supported; supported: {sorted(ROPE_KEYS)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse(f"partial_rotary_factor = {params['partial_rotary_factor']} is not supported (only 1.0)")
    for key in params:
        if key not in _ROPE_ALWAYS and key not in ROPE_KEYS[rope_type]:
            raise refuse(f"{key} is not supported with rope_type {rope_type!r} (megatron-core's "
                         f"{rope_type} RoPE takes only {list(ROPE_KEYS[rope_type]) or 'no parameters'})")
    if rope_type == "default":
        return RopeScaling(), theta
    if "factor" not in params:
        raise refuse(f"rope_type {rope_type!r} needs a factor")
    factor = float(params["factor"])
    if rope_type == "llama3":
        for key, fixed in MEGATRON_LLAMA3_FIXED.items():
            if key in params and float(params[key]) != fixed:
                raise refuse(f"{key} = {params[key]} is not supported: megatron-core's llama3 RoPE scaling "
                             f"fixes it at {fixed:g} (only the factor is configurable)")
        return RopeScaling("llama3", factor), theta
    if rope_type == "linear":
        return RopeScaling("linear", factor), theta
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        # transformers then uses 0.1*ln(factor)+1 as the attention factor, which is what
        # megatron-core computes when it is given no mscale values.
        mscale = mscale_all_dim = None
    return RopeScaling(
        "yarn", factor,
        original_max_position_embeddings=int(params.get("original_max_position_embeddings")
                                             or cfg.get("max_position_embeddings", 4096)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=None if mscale is None else float(mscale),
        mscale_all_dim=None if mscale_all_dim is None else float(mscale_all_dim),
        truncate=bool(params.get("truncate", True)),
    ), theta


def _biases(cfg: dict[str, Any], family: Family) -> tuple[bool, bool]:
    """(qkv_bias, linear_bias). megatron-core has two switches: add_qkv_bias (q/k/v only) and
    add_bias_linear (every linear: qkv, o_proj, gate/up, down)."""
    attention = bool(family.attention_bias_key and cfg.get(family.attention_bias_key))
    mlp = bool(family.mlp_bias_key and cfg.get(family.mlp_bias_key))
    if attention != mlp or (attention and not family.mlp_bias_key):
        present = [k for k in (family.attention_bias_key, family.mlp_bias_key) if k and cfg.get(k)]
        missing = [k for k in (family.attention_bias_key, family.mlp_bias_key) if k and not cfg.get(k)]
        raise ValueError(
            f"{' and '.join(present)} without {' and '.join(missing) or 'MLP biases'} is not supported: "
            f"megatron-core puts biases on o_proj and on the MLP together (add_bias_linear) or on neither")
    return family.qkv_bias or attention, attention and mlp


def hf_arch(hf_config: Union[dict, Any]) -> HFArch:
    """Validate a HF config (dict or PretrainedConfig) and pull out the shape."""
    cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported HF model_type {model_type!r} (architectures {cfg.get('architectures')}); "
            f"supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only SwiGLU (hidden_act 'silu') is supported, got {cfg.get('hidden_act')!r}")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise ValueError("sliding-window attention (use_sliding_window / layer_types) is not supported")
    if int(cfg.get("pretraining_tp") or 1) != 1:
        raise ValueError(f"pretraining_tp = {cfg['pretraining_tp']} is not supported (only 1)")
    rope, rope_theta = _rope_scaling(cfg)
    qkv_bias, linear_bias = _biases(cfg, family)
    heads = cfg["num_attention_heads"]
    if not family.head_dim_key and cfg.get("head_dim") and cfg["head_dim"] != cfg["hidden_size"] // heads:
        raise ValueError(f"head_dim = {cfg['head_dim']} differs from hidden_size / num_attention_heads = "
                         f"{cfg['hidden_size'] // heads}: vLLM's {model_type} ignores head_dim, so its engine "
                         f"would not match this checkpoint")
    architecture = (cfg.get("architectures") or [""])[0]
    score_head = architecture.endswith(("ForSequenceClassification", "ForTokenClassification"))
    return HFArch(
        num_labels=len(cfg.get("id2label") or {0: "LABEL_0"}) if score_head else 0,
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        ffn_hidden_size=cfg["intermediate_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)) and not score_head,
        qkv_bias=qkv_bias,
        qk_norm=family.qk_norm,
        linear_bias=linear_bias,
        rope=rope,
    )


def check_parallel_layout(arch: HFArch, tp: int, pp: int) -> None:
    """Raise a clear error when TP/PP cannot split this model evenly."""
    problems = []
    if arch.num_heads % tp:
        problems.append(f"num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        problems.append(f"num_key_value_heads={arch.num_kv_heads} (kv groups)")
    if arch.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={arch.ffn_hidden_size}")
    if arch.vocab_size % tp:
        problems.append(f"vocab_size={arch.vocab_size}")
    if problems:
        raise ValueError(f"tensor parallel size {tp} does not divide {', '.join(problems)}")
    if arch.num_layers % pp:
        raise ValueError(f"pipeline parallel size {pp} does not divide num_hidden_layers={arch.num_layers}")


def transformer_config_from_hf(
    hf_config: Union[dict, Any],
    tp: int = 1,
    pp: int = 1,
    params_dtype: Optional[torch.dtype] = None,
    **overrides: Any,
):
    """A megatron ``TransformerConfig`` equivalent to a HF Llama/Qwen2/Qwen3 config.

    fp32 on CPU (fusions off: they fail or JIT-compile for seconds there),
    bf16 on GPU unless ``params_dtype`` says otherwise. ``overrides`` are
    passed to ``TransformerConfig`` last (e.g. ``recompute_granularity``).
    """
    from megatron.core.transformer import TransformerConfig

    arch = hf_arch(hf_config)
    check_parallel_layout(arch, tp, pp)
    gpu = platform.has_gpu()
    if params_dtype is None:
        params_dtype = torch.bfloat16 if gpu else torch.float32
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=arch.linear_bias,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        rotary_interleaved=False,  # HF rotate_half layout: no weight permutation needed
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # On CPU, create the weights there. perform_initialization must stay
        # True even though the checkpoint overwrites the weights: megatron only
        # tags sharded weights as tensor-parallel (set_tensor_model_parallel_
        # attributes) inside its init functions, and untagged shards are taken
        # for TP duplicates, which silently halves the grad norm under TP2.
        use_cpu_initialization=not gpu,
        perform_initialization=True,
        # CPU: gradient_accumulation_fusion / rope fusion / persist_layer_norm
        # fail, and the other fusions only cost JIT time.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=False,
        # megatron-core's default ("full") is a deprecated spelling of [] that warns in every worker.
        cuda_graph_scope=[],
        # (variable_seq_lengths stays off: the module pads all micro-batches
        # of one call to a common length, so the pipeline's p2p shapes are fixed.)
    )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    if arch.rope.rope_type == "yarn":
        # GPTModel(position_embedding_type="yarn") and the attention's YaRN
        # attention factor read these from the config; only megatron's MLA config
        # class declares them, so they are set on the instance.
        rope = arch.rope
        for name, value in (("yarn_rotary_scaling_factor", rope.factor),
                            ("yarn_original_max_position_embeddings", rope.original_max_position_embeddings),
                            ("yarn_beta_fast", rope.beta_fast), ("yarn_beta_slow", rope.beta_slow),
                            ("yarn_mscale", rope.mscale), ("yarn_mscale_all_dim", rope.mscale_all_dim),
                            ("yarn_correction_range_round_to_int", rope.truncate)):
            setattr(config, name, value)
    return config


def rope_model_kwargs(arch: HFArch) -> dict[str, Any]:
    """GPTModel's RoPE arguments for the checkpoint's scaling (``hf_arch`` refused the rest)."""
    rope = arch.rope
    kwargs: dict[str, Any] = dict(position_embedding_type="rope", rotary_base=arch.rope_theta)
    if rope.rope_type == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=rope.factor)
    elif rope.rope_type == "linear":
        # HF divides the frequencies by the factor, megatron the positions: the same angles.
        kwargs.update(seq_len_interpolation_factor=rope.factor)
    elif rope.rope_type == "yarn":
        kwargs.update(position_embedding_type="yarn")  # parameters: on the config (transformer_config_from_hf)
    return kwargs


ATTENTION_BACKENDS = ("sdpa", "local")


def build_gpt_model(hf_config: Union[dict, Any], config, vp_stage: Optional[int] = None,
                    attention_backend: str = "sdpa") -> torch.nn.Module:
    """This rank's GPTModel stage (megatron parallel state must be initialized).

    The layers are megatron-core's local spec; ``attention_backend`` picks the
    core attention: ``sdpa`` (:class:`SDPAttention`, torch's fused kernels,
    FlashAttention on GPU) or ``local`` (megatron-core's ``DotProductAttention``).
    On GPU a bf16/fp16 model is wrapped in ``Float16Module`` (fp32 inputs and
    outputs around half-precision compute).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from chatlearn.models.megatron.attention import SDPAttention

    arch = hf_arch(hf_config)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
    if attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    with cpu_compat.cpu_device_mode():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            **rope_model_kwargs(arch),
            # Vocab-parallel logits: each TP rank keeps its [b, s, V / TP] slice and the log-probs
            # and entropy are reduced over TP (chatlearn.algorithms.vocab_parallel), so no rank
            # holds the full-vocabulary logits. A score model's ScoreHead below ignores it.
            parallel_output=True,
        )
        if arch.num_labels and model.post_process:
            model.output_layer = ScoreHead(arch.hidden_size, arch.num_labels, config.params_dtype)
    if platform.has_gpu():
        model = model.cuda()
        if config.bf16 or config.fp16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
    return model


def vocab_parallel_output(model: torch.nn.Module) -> bool:
    """Whether ``model``'s output is vocab-parallel logits (a causal LM's last stage under TP:
    each rank its vocabulary slice), not a score head's [b, s, num_labels]."""
    gpt = unwrap(model)
    return bool(getattr(gpt, "parallel_output", False)) and not isinstance(getattr(gpt, "output_layer", None),
                                                                         ScoreHead)


class ScoreHead(torch.nn.Module):
    """A scalar (or few-label) head on the last stage, in place of the vocab output layer.

    Replicated over TP ranks: its input (the final norm's output) is the same
    on every TP rank, so are its gradients, and megatron counts an untagged
    parameter once in the grad norm. Called like ColumnParallelLinear
    (returns ``(output, bias)``), so GPTModel.forward needs no change;
    the model's "logits" are then [b, s, num_labels].
    """

    def __init__(self, hidden_size: int, num_labels: int, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_labels, hidden_size, dtype=dtype))
        self.sequence_parallel = False  # GPTModel reads this in inference mode

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        return F.linear(hidden_states, self.weight), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """For dist_checkpointing: one global tensor, replicated over TP and DP (no TP axis)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        # keep_vars: the optimizer's sharded state is matched to the Parameter objects.
        return make_sharded_tensors_for_checkpoint(self.state_dict(keep_vars=True), prefix, {}, sharded_offsets)


def optimizer_parts(optimizer) -> list:
    """The megatron optimizers inside ``optimizer`` (a ChainedOptimizer's parts, or itself);
    each holds its torch optimizer as ``.optimizer``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model
