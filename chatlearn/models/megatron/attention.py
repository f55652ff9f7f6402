"""Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local layer spec computes attention as two batched matmuls
around a materialised [b, heads, s, s] score tensor (``DotProductAttention``).
Torch's SDPA picks a fused kernel instead: FlashAttention-2 on GPUs for
bf16/fp16, a memory-efficient or math kernel elsewhere (CPU fp32 runs the
math one), with no s x s tensor in memory on the fused paths. Transformer
Engine would do the same but its wheels do not travel to the GPU machines, so
this module takes ``DotProductAttention``'s place in the local spec: the same
constructor and forward signature, the same inputs and output layout.

Only what chatlearn builds is supported: causal self-attention, no attention
mask tensor (sequences are right-padded; causal masking keeps the real tokens
exact), no packed sequences, no context parallelism.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` (local spec), causal only."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if config.apply_query_key_layer_scaling or getattr(config, "window_size", None):
            raise ValueError("SDPAttention supports neither query-key layer scaling nor window attention")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None) -> torch.Tensor:
        """query [sq, b, heads, d], key/value [sk, b, kv groups, d] -> context [sq, b, heads * d]."""
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention is causal only: no attention mask, bias or packed sequences")
        sq, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads are split over TP ranks: each rank drops out its own heads with its own
        # stream, as megatron's DotProductAttention does (no-op without dropout).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
                dropout_p=dropout_p)
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
