"""Build a megatron-core GPTModel shaped like a Hugging Face Llama / Qwen2 checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from chatlearn.models.megatron import cpu_compat
from chatlearn.utils import platform

# HF model_type -> what differs between the supported decoder families.
# Both are pre-norm RMSNorm + SwiGLU + RoPE (rotate_half) with GQA; Qwen2 adds
# biases to q/k/v only.
SUPPORTED_MODEL_TYPES = {
    "llama": {"qkv_bias": False},
    "qwen2": {"qkv_bias": True},
}


@dataclass(frozen=True)
class HFArch:
    """The parts of a HF config that decide the Megatron model's shape."""

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

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def load_hf_config(model_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read ``config.json`` of a HF checkpoint dir, with errors that name the path."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"HF checkpoint directory not found: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in HF checkpoint directory {model_dir}")
    with open(path) as f:
        return json.load(f)


def hf_arch(hf_config: Union[dict, Any]) -> HFArch:
    """Validate a HF config (dict or PretrainedConfig) and pull out the shape."""
    cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported HF model_type {model_type!r} (architectures {cfg.get('architectures')}); "
            f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only SwiGLU (hidden_act 'silu') is supported, got {cfg.get('hidden_act')!r}")
    heads = cfg["num_attention_heads"]
    # transformers 5 keeps rope_theta under rope_parameters; 4.x at top level.
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"only default RoPE is supported, got {rope or cfg.get('rope_scaling')}")
    if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError("Llama with attention_bias/mlp_bias is not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
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
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)) and not score_head,
        qkv_bias=SUPPORTED_MODEL_TYPES[model_type]["qkv_bias"],
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
    """A megatron ``TransformerConfig`` equivalent to a HF Llama/Qwen2 config.

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
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
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
    return TransformerConfig(**kwargs)


def build_gpt_model(hf_config: Union[dict, Any], config, vp_stage: Optional[int] = None) -> torch.nn.Module:
    """This rank's GPTModel stage (megatron parallel state must be initialized).

    On GPU a bf16/fp16 model is wrapped in ``Float16Module`` (fp32 inputs and
    outputs around half-precision compute).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    arch = hf_arch(hf_config)
    with cpu_compat.cpu_device_mode():
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            # Full-vocab logits are gathered inside the model; simpler for logprobs.
            parallel_output=False,
        )
        if arch.num_labels and model.post_process:
            model.output_layer = ScoreHead(arch.hidden_size, arch.num_labels, config.params_dtype)
    if platform.has_gpu():
        model = model.cuda()
        if config.bf16 or config.fp16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
    return model


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
