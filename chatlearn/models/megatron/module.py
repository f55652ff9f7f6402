"""``MegatronModule``: a chatlearn model role backed by a megatron-core GPTModel.

Each worker (one Ray actor per rank, torch.distributed already initialized
by the engine) builds its TP/PP shard of a Llama/Qwen2/Qwen3 model from a Hugging
Face checkpoint. Inference roles get token log-probs from ``forward_step``;
trainers subclass and override :meth:`MegatronModule.loss_fn`.

Settings come from the model's config entry (``tensor_model_parallel_size``,
``pipeline_model_parallel_size``, ``trainable``) and its free-form args
(``load``, ``lr``, ...), see :class:`MegatronSettings`; programmatic users
and tests may assign ``module.settings`` before ``setup()`` instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from chatlearn.algorithms.core import (GLOBAL_NUM_SAMPLES, GLOBAL_NUM_TOKENS, SAMPLING_KEYS, LossAggregator,
                                       sampling_logprobs)
from chatlearn.data.batching import SAMPLE_VALID, split_batch, split_global_batch
from chatlearn.models.base import BaseModule
from chatlearn.models.megatron import cpu_compat, dist_ckpt
from chatlearn.models.megatron.hf_convert import export_hf_state_dict, load_hf_weights, save_hf_checkpoint
from chatlearn.models.megatron.lora import convert_layer_to_lora
from chatlearn.models.megatron.model import (ATTENTION_BACKENDS, build_gpt_model, hf_arch, load_hf_config,
                                             optimizer_parts, transformer_config_from_hf, unwrap)
from chatlearn.models.megatron.parallel import initialize_parallel_state
from chatlearn.models.megatron.schedule import (forward_logits, forward_logprobs, group_by_length, pad_micro_batches,
                                               run_micro_batches, vocab_group)
from chatlearn.models.offload import HostOffload, model_tensors, offload_target_available
from chatlearn.utils import platform
from chatlearn.utils.rng import capture_rng_state, restore_rng_state


# The learning-rate schedule's position (same on every rank), saved beside the model state.
SCHEDULER_FILE = "lr_scheduler.json"


@dataclass
class MegatronSettings:
    load: str                       # HF checkpoint dir (config.json + weights)
    tp: int = 1
    pp: int = 1
    trainable: bool = False
    optimizer: str = "adam"         # "adam" or "sgd" (megatron's OptimizerConfig names)
    lr: float = 1e-5
    weight_decay: float = 0.0
    clip_grad: float = 1.0          # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    use_distributed_optimizer: bool = False
    seed: int = 1234
    # Fills input_ids past a row's end only (pad_micro_batches): the losses count loss_mask / seq_lens,
    # never ids != pad, so any id works, also for a tokenizer without a pad token (Llama 3).
    pad_token_id: int = 0
    forward_micro_batch_size: int = 0  # forward_step splits its batch into these; 0: one micro-batch
    lora_rank: int = 0                 # > 0: train LoRA factors only (lora.py)
    lora_scaling: float = 1.0          # LoRA output scale (alpha / rank)
    lora_targets: tuple = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    # save_checkpoint writes megatron dist_checkpointing (loads under any TP/PP/DP
    # layout) instead of per-rank files; from_args takes the default from
    # runtime.adaptive_parallel_strategy_on_checkpoint.
    adaptive_checkpoint: bool = False
    # Learning-rate schedule (megatron's OptimizerParamScheduler), stepped once per train_step:
    # linear warm-up from 0 over lr_warmup_steps, then lr_decay_style ("constant", "linear",
    # "cosine", "inverse-square-root") from lr down to min_lr by step lr_decay_steps.
    lr_decay_style: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0           # 0: the schedule ends with the warm-up
    min_lr: float = 0.0
    # Training-time dropout (Megatron-LM's names; off in forward_step, which runs in eval mode).
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # "auto": bfloat16 on GPU, float32 on CPU; "bfloat16", "float16", "float32" (CPU: always float32).
    params_dtype: str = "auto"
    # Activation recompute in training (megatron's TransformerConfig names): None, "selective", "full".
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Core attention: "sdpa" (torch's scaled_dot_product_attention: FlashAttention on GPU) or
    # "local" (megatron-core's DotProductAttention, which materialises the s x s scores).
    attention_backend: str = "sdpa"

    @classmethod
    def from_args(cls, module_args: Any, model_args: dict, name: str = "", log_warnings: bool = False,
                  adaptive_checkpoint: bool = False) -> "MegatronSettings":
        """From a ``models:`` entry (parallel sizes, trainable) and its free-form args.

        ChatLearn 1.x / Megatron-LM keys are read through ``chatlearn.models.chatlearn1x_args``:
        mapped to these fields (``lr_warmup_iters`` -> ``lr_warmup_steps``), checked against the
        Hugging Face checkpoint in ``load`` (``num_layers``, ...: a disagreement is a ValueError
        naming the file, the key and both values), or accepted with a warning (logged when
        ``log_warnings``). Other keys that are not fields here are ignored: one model config file
        may carry other backends' settings too. ``adaptive_checkpoint`` is the run's
        ``runtime.adaptive_parallel_strategy_on_checkpoint`` (a model arg of that name wins).
        """
        from chatlearn.models import chatlearn1x_args as cl1x

        names = {f.name for f in dataclasses.fields(cls)} - {"tp", "pp", "trainable"}
        known = {k: v for k, v in model_args.items() if k in names and v is not None}
        if not known.get("load"):
            raise ValueError("megatron model args need 'load' (a Hugging Face checkpoint dir)")
        trainable = bool(module_args.trainable)
        review = cl1x.review_backend_args(model_args, cl1x.MEGATRON, trainable=trainable,
                                          sources=cl1x.sources_for(module_args), model=name)
        review.raise_errors()
        mapped = dict(review.settings)
        # Megatron-LM's schedule rules: decay over train_iters unless lr_decay_iters is given;
        # lr_warmup_fraction of the decay steps unless lr_warmup_iters is given.
        train_iters, fraction = mapped.pop("train_iters", None), mapped.pop("lr_warmup_fraction", None)
        if train_iters and "lr_decay_steps" not in known:
            mapped.setdefault("lr_decay_steps", train_iters)
        if fraction and "lr_warmup_steps" not in known and "lr_warmup_steps" not in mapped:
            mapped["lr_warmup_steps"] = int(fraction * known.get("lr_decay_steps", mapped.get("lr_decay_steps", 0)))
        for key, value in mapped.items():
            known.setdefault(key, value)
        if not platform.has_gpu():
            # Settings that only exist on GPU (megatron's recompute needs CUDA in its backward pass).
            for key, why in (("params_dtype", "megatron computes in float32 there"),
                             ("recompute_granularity", "activation recompute (memory for compute, same results) "
                                                       "runs on GPU only")):
                if known.get(key) not in (None, "auto", "float32"):
                    review.warnings.append(cl1x.cpu_only_warning(model_args, key, known[key], why,
                                                                 cl1x.sources_for(module_args), name))
        if log_warnings:
            review.log_warnings(f"model {name!r}" if name else "megatron model")
        lora = getattr(module_args, "lora", None)
        if lora is not None and lora.enable_lora:
            if lora.lora_dropout:
                raise ValueError("lora_dropout is not supported by the megatron backend")
            kinds = {k.strip() for k in lora.lora_layer.split(",")}
            targets = []
            if "ColumnParallelLinear" in kinds:
                targets += ["linear_qkv"] if lora.column_only_qkv else ["linear_qkv", "linear_fc1"]
            if "RowParallelLinear" in kinds:
                targets += ["linear_proj", "linear_fc2"]
            if not targets:
                # (LinearLayer and VocabParallelEmbedding have no LoRA form on this backend.)
                raise ValueError(f"lora.lora_layer {lora.lora_layer!r} selects no layer the megatron backend can "
                                 f"adapt: name ColumnParallelLinear and/or RowParallelLinear")
            known.update(lora_rank=lora.lora_dim, lora_scaling=lora.lora_scaling, lora_targets=tuple(targets))
        known.setdefault("adaptive_checkpoint", adaptive_checkpoint)
        return cls(**known, tp=module_args.tensor_model_parallel_size,
                   pp=module_args.pipeline_model_parallel_size, trainable=trainable)

    def transformer_overrides(self) -> dict[str, Any]:
        """``transformer_config_from_hf`` keyword arguments from these settings."""
        overrides: dict[str, Any] = {"hidden_dropout": float(self.hidden_dropout),
                                     "attention_dropout": float(self.attention_dropout)}
        if self.params_dtype not in ("auto", None) and platform.has_gpu():
            overrides["params_dtype"] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                         "float32": torch.float32}[self.params_dtype]
        if self.recompute_granularity and platform.has_gpu():
            overrides["recompute_granularity"] = self.recompute_granularity
            if self.recompute_granularity == "full":
                overrides["recompute_method"] = self.recompute_method or "uniform"
                overrides["recompute_num_layers"] = int(self.recompute_num_layers or 1)
        return overrides


class MegatronModule(BaseModule):
    settings: Optional[MegatronSettings] = None
    # Without pipeline parallelism, forward_step sorts its rows by length across micro-batches
    # (less padding; the outputs come back in order). train_step does so only for a class
    # that sets this: its loss_fn must treat rows independently. Off by default, because a
    # loss may rely on how rows are grouped (a reward model's or DPO's stacked pairs).
    group_rows_by_length = False

    def __init__(self, name: str):
        super().__init__(name)
        self.model: Optional[torch.nn.Module] = None
        self.optimizer = None
        self.scheduler = None  # megatron OptimizerParamScheduler (trainable models)
        self.hf_config: Optional[dict] = None
        self.config = None  # megatron TransformerConfig
        self._host = HostOffload()

    # -- setup --------------------------------------------------------------------
    def setup(self) -> None:
        if self.settings is None:
            # Warnings about the model's 1.x keys: once per model, not once per rank.
            first = self.worker is None or (self.worker.replica_id == 0 and self.worker.rank == 0)
            self.settings = MegatronSettings.from_args(
                self.module_args, self.model_args, name=self.name, log_warnings=first,
                adaptive_checkpoint=self.runtime_args.adaptive_parallel_strategy_on_checkpoint)
        s = self.settings
        if self.worker is not None and (self.worker.tp_size, self.worker.pp_size) != (s.tp, s.pp):
            raise ValueError(f"model {self.name!r}: engine placed tp={self.worker.tp_size} "
                             f"pp={self.worker.pp_size}, settings say tp={s.tp} pp={s.pp}")
        # Read and validate the config before touching distributed state, so a
        # bad path or layout fails fast with a clear message on every rank.
        if s.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model {self.name!r}: attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {s.attention_backend!r}")
        self.hf_config = load_hf_config(s.load)
        self.config = transformer_config_from_hf(self.hf_config, s.tp, s.pp, **s.transformer_overrides())
        initialize_parallel_state(s.tp, s.pp, seed=s.seed)
        model = build_gpt_model(self.hf_config, self.config, attention_backend=s.attention_backend)
        load_hf_weights(model, self.hf_config, s.load)
        if s.lora_rank:
            convert_layer_to_lora(model, s.lora_rank, s.lora_scaling * s.lora_rank, s.lora_targets, seed=s.seed)
        if s.trainable:
            model, self.optimizer = self._build_trainer(model)
            self.scheduler = self._build_scheduler()
        self.model = model

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        s = self.settings
        decay_steps = max(s.lr_decay_steps, s.lr_warmup_steps + 1)
        # The optimizer's param groups carry max_lr / min_lr (from OptimizerConfig); these are
        # the scheduler's defaults for groups without them.
        scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if s.lr_warmup_steps else s.lr, max_lr=s.lr, min_lr=min(s.min_lr, s.lr),
            lr_warmup_steps=s.lr_warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=s.lr_decay_style,
            start_wd=s.weight_decay, end_wd=s.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")
        scheduler.step(0)  # puts the step-0 learning rate into the optimizer
        return scheduler

    def _build_trainer(self, model: torch.nn.Module):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        s, config = self.settings, self.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=s.use_distributed_optimizer,
            overlap_grad_reduce=False,
        )
        with cpu_compat.cpu_device_mode():
            model = DistributedDataParallel(config, ddp_config, model)
            optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer=s.optimizer, lr=s.lr, min_lr=min(s.min_lr, s.lr), weight_decay=s.weight_decay,
                    clip_grad=s.clip_grad,
                    adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2,
                    bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                    use_distributed_optimizer=s.use_distributed_optimizer,
                ),
                [model],
                use_gloo_process_groups=platform.has_gpu(),
            )
        if not platform.has_gpu():
            # The distributed optimizer gathers its state for checkpoints over
            # a "gloo" DP group; on CPU the DP group is gloo already.
            for opt in optimizer_parts(optimizer):
                if hasattr(opt, "data_parallel_group_gloo"):
                    opt.data_parallel_group_gloo = opt.data_parallel_group
        # Without this the schedule never all-reduces DP grads (nor tied embedding grads over PP).
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        return model, optimizer

    # -- inference ----------------------------------------------------------------
    def _micro_batches(self, data: dict) -> tuple[list[dict], int, Optional[torch.Tensor]]:
        """``data``'s rows as micro-batches of ``forward_micro_batch_size`` rows, padded at the
        tail (``_pad``); the number of real rows; and where each row went (None: in order)."""
        keys = ("input_ids", "attention_mask", "loss_mask", *SAMPLING_KEYS)
        rows = split_batch({k: data[k] for k in keys if isinstance(data.get(k), torch.Tensor)})
        size = self.settings.forward_micro_batch_size or len(rows)
        (micro_batches,) = split_global_batch(rows, 1, size)
        micro_batches, order = self._pad(micro_batches, regroup=True)
        return micro_batches, len(rows), order

    def _pad(self, micro_batches: list[dict], regroup: bool) -> tuple[list[dict], Optional[torch.Tensor]]:
        """Equal-shaped micro-batches under pipeline parallelism (its stages exchange fixed-shape
        buffers) or without ``regroup``; otherwise the rows sorted by length, each micro-batch
        padded only to its own longest row (``group_by_length``; the order says where each row went)."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() > 1 or not regroup:
            return pad_micro_batches(micro_batches, pad_id=self.settings.pad_token_id), None
        return group_by_length(micro_batches, pad_id=self.settings.pad_token_id)

    @property
    def is_score_model(self) -> bool:
        return bool(hf_arch(self.hf_config).num_labels)

    def forward_step(self, data: dict, iteration: int) -> dict:
        """On the last stage: ``{"logprobs": [b, s]}`` for a causal LM, aligned with
        ``input_ids`` (position t holds log p(token t | tokens < t), position 0 holds 0);
        ``{"values": [b, s]}`` for a reward/value model, the head's output at each
        position (one label; [b, s, n] with n labels). ``{}`` on other stages.
        ``data["input_ids"]`` is [b, s], right-padded.

        Log-probs are of the sampling distribution when ``data`` carries the rollout's
        settings (``SAMPLING_KEYS``: temperature everywhere, top-k/top-p where
        ``loss_mask`` is set; see ``chatlearn.algorithms.core.sampling_logprobs``), else
        of the model's plain softmax.
        """
        micro_batches, rows, order = self._micro_batches(data)
        width = data["input_ids"].shape[1]
        run = forward_logits if self.is_score_model else forward_logprobs
        out = run(self.model, micro_batches)
        if out is None:
            return {}
        if order is not None:  # back to the input's row order
            out = torch.zeros_like(out).index_copy_(0, order, out)
        out = torch.nn.functional.pad(out, (0, 0) * (out.dim() - 2) + (0, max(0, width - out.shape[1])))
        out = out[:rows, :width]
        if self.is_score_model:
            return {"values": out[..., 0] if out.shape[-1] == 1 else out}
        return {"logprobs": out}

    # -- training -----------------------------------------------------------------
    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch from its logits (last stage only).

        A causal LM's ``logits`` are vocab-parallel: this tensor-parallel rank's slice of the
        vocabulary, ``[b, s, V / TP]``, in the model's dtype. Get token log-probs and entropies
        from them with ``chatlearn.models.megatron.schedule.micro_batch_logprobs_and_entropy``
        (the micro-batch's sampling settings) or ``chatlearn.algorithms.core``'s
        ``sampling_logprobs_and_entropy`` / ``sampling_logprobs`` / ``entropy_from_logits`` with
        ``group=vocab_group()``; they reduce over the TP group, a chunk of positions at a
        time, and never build the full-vocabulary fp32 logits. A score model's ``logits``
        are its head's ``[b, s, num_labels]``, the same on every TP rank.

        Returns ``(loss, metrics)`` where the loss and every metric are this
        micro-batch's SHARE of the global batch's value: build them with
        ``LossAggregator(micro_batch, mask)``, which divides by the global
        batch's totals (``train_step`` puts them in every micro-batch) and
        leaves padding rows out. ``train_step`` sums the shares over the
        micro-batches and the data-parallel ranks, so the optimizer sees the
        gradient of the global batch's loss, whatever the split.

        A class that sets ``group_rows_by_length`` gets its rows sorted by length across
        micro-batches (other micro-batches than they were sent in); the shares add up to
        the same global value.

        Default: next-token cross entropy, token mean over ``loss_mask``
        (aligned with ``input_ids``; default: every real token after the
        first); reward/value models must override.
        """
        if self.is_score_model:
            raise NotImplementedError(f"{type(self).__name__}: a reward/value model needs its own loss_fn")
        input_ids = micro_batch["input_ids"].to(logits.device)
        logp = sampling_logprobs(logits, input_ids, group=vocab_group())
        agg = LossAggregator(micro_batch, _token_mask(micro_batch).to(logits.device))
        loss = agg.token_mean(-logp)
        return loss, {"loss": loss.detach()}

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        """One optimizer step over this DP rank's micro-batches; metrics on the last stage.

        ``data_list`` is this rank's part of one global batch
        (``chatlearn.data.batching.split_global_batch``: every rank the same
        number of equal-shaped micro-batches, padding rows with ``sample_valid``
        0). Returns the global batch's metrics (summed shares, see ``loss_fn``)
        on output ranks, None elsewhere.
        """
        if self.optimizer is None:
            raise RuntimeError(f"model {self.name!r} is not trainable (set trainable: true)")
        from megatron.core import parallel_state as ps

        model = self.model
        model.train()
        model.zero_grad_buffer()
        self.optimizer.zero_grad()
        mbs, _ = self._pad([{k: v for k, v in d.items() if isinstance(v, torch.Tensor)} for d in data_list],
                           regroup=self.group_rows_by_length)
        _set_global_totals(mbs)
        # Megatron divides each micro-batch's loss by their number and DDP averages
        # gradients over DP ranks; a share of the global loss must be summed instead.
        scale = len(mbs) * ps.get_data_parallel_world_size()

        def scaled_loss(logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
            loss, metrics = self.loss_fn(logits, micro_batch)
            return loss * scale, metrics

        results = run_micro_batches(model, mbs, scaled_loss, forward_only=False)
        with cpu_compat.cpu_device_mode():
            ok, grad_norm, _ = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if ok:
            self.scheduler.step(1)
        if not results:
            return None
        metrics = _sum_over_data_parallel(results)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_successful"] = bool(ok)
        metrics["lr"] = float(lr)
        return metrics

    # -- weights ------------------------------------------------------------------
    def is_output_rank(self) -> bool:
        from megatron.core import parallel_state as ps

        return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    def named_parameters_for_sync(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Full HF-named weights on every rank (collective over TP and PP), on the host
        or (``device="cuda"``) left on this rank's GPU."""
        return export_hf_state_dict(self.model, self.hf_config,
                                    device=platform.torch_device() if device == "cuda" else torch.device(device))

    def load_parameters_from_sync(self, params: dict[str, torch.Tensor]) -> None:
        load_hf_weights(self.model, self.hf_config, params)

    def probe_vocab_size(self) -> int:
        """Token ids below this are valid inputs (the probe of validate_param_sync)."""
        return int(hf_arch(self.hf_config).vocab_size)

    def probe_outputs(self, token_ids) -> Optional[torch.Tensor]:
        """The probe of validate_param_sync: ``[b, s]`` log-probs of ``token_ids`` (position 0
        holds 0) for a causal LM, values for a reward/value model, on the output rank (None
        elsewhere). Collective over every rank of the model: MegatronModule's own
        ``forward_step`` (a subclass's override may compute something else), plain softmax."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        out = MegatronModule.forward_step(self, {"input_ids": ids}, 0)
        result = out.get("values", out.get("logprobs"))
        return None if result is None or not self.is_output_rank() else result.detach().float().cpu()

    def save_hf_checkpoint(self, path: str) -> None:
        """A transformers/vLLM-loadable checkpoint dir (collective; rank 0 writes)."""
        save_hf_checkpoint(self.model, self.hf_config, path, source_dir=self.settings.load)

    # -- checkpoints --------------------------------------------------------------
    def _rank_file(self, path: str) -> str:
        from megatron.core import parallel_state as ps

        return os.path.join(path, f"mp_tp{ps.get_tensor_model_parallel_rank():02d}"
                                  f"_pp{ps.get_pipeline_model_parallel_rank():02d}"
                                  f"_dp{ps.get_data_parallel_rank():03d}.pt")

    def _checkpoint_info(self, fmt: str, weights_only: bool = False) -> dict:
        """This model as :mod:`dist_ckpt` describes a checkpoint of it (optimizer: when trainable)."""
        s = self.settings
        with_optimizer = self.optimizer is not None and not weights_only
        return dist_ckpt.describe_checkpoint(
            self.hf_config, fmt, lora_rank=s.lora_rank, lora_targets=s.lora_targets,
            optimizer=s.optimizer if with_optimizer else None,
            distributed_optimizer=s.use_distributed_optimizer)

    def save_checkpoint(self, path: str) -> None:
        """Model, optimizer and RNG state under ``path`` (collective; returns when all ranks wrote).

        With ``settings.adaptive_checkpoint`` (runtime
        ``adaptive_parallel_strategy_on_checkpoint``) a megatron
        dist_checkpointing checkpoint that loads under any TP/PP/DP layout;
        otherwise one file per rank that loads only under this layout.
        """
        if self.scheduler is not None and dist.get_rank() == 0:
            from chatlearn.utils.atomic import atomic_write_bytes

            os.makedirs(path, exist_ok=True)
            atomic_write_bytes(os.path.join(path, SCHEDULER_FILE),
                               json.dumps({"num_steps": self.scheduler.num_steps}).encode())
        if self.settings.adaptive_checkpoint:
            dist_ckpt.save_distributed(self.model, self.optimizer, path,
                                       self._checkpoint_info(dist_ckpt.FORMAT_DIST))
            return
        from chatlearn.utils.atomic import atomic_torch_save

        os.makedirs(path, exist_ok=True)
        state = {"model": unwrap(self.model).state_dict(), "tp": self.settings.tp, "pp": self.settings.pp,
                 "rng": capture_rng_state()}
        if self.optimizer is not None:
            with cpu_compat.cpu_device_mode():
                state["optimizer"] = self.optimizer.state_dict()
                if self.settings.use_distributed_optimizer:
                    # The sharded Adam moments are not in state_dict(); gather them
                    # per TP/PP rank onto DP rank 0, which writes them.
                    self.optimizer.save_parameter_state(self._param_state_file(path))
                    state["adam_step"] = _inner_steps(self.optimizer)
        atomic_torch_save(state, self._rank_file(path))
        dist_ckpt.write_checkpoint_info(path, self._checkpoint_info(dist_ckpt.FORMAT_PER_RANK))
        dist.barrier()

    def _param_state_file(self, path: str) -> str:
        """Distributed-optimizer state: one file per TP/PP rank, written by DP rank 0."""
        from megatron.core import parallel_state as ps

        return os.path.join(path, f"optim_tp{ps.get_tensor_model_parallel_rank():02d}"
                                  f"_pp{ps.get_pipeline_model_parallel_rank():02d}.pt")

    def load_checkpoint(self, path: str) -> None:
        """Load what :meth:`save_checkpoint` wrote, in either format (told by the checkpoint itself).

        Every rank checks the checkpoint's metadata first, so another
        architecture, LoRA setup or optimizer, or a per-rank checkpoint under a
        different layout, fails with a ValueError naming ``path`` before
        anything is loaded; a missing ``path`` raises FileNotFoundError.
        """
        saved = dist_ckpt.read_checkpoint_info(path)
        if saved is not None:
            current = self._checkpoint_info(saved["format"])
            dist_ckpt.check_checkpoint(path, saved, current)
        self._load_scheduler(path)
        if saved is not None and saved["format"] == dist_ckpt.FORMAT_DIST:
            dist_ckpt.load_distributed(self.model, self.optimizer, path, saved, current)
            return
        file = self._rank_file(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"model {self.name!r}: no checkpoint shard at {file} (a per-rank checkpoint "
                                    f"loads only under the layout it was saved with; see "
                                    f"runtime.{dist_ckpt.FLAG_NAME})")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if (state["tp"], state["pp"]) != (self.settings.tp, self.settings.pp):
            raise ValueError(f"{file} was saved with tp={state['tp']} pp={state['pp']}, "
                             f"this model runs tp={self.settings.tp} pp={self.settings.pp}; a per-rank "
                             f"checkpoint loads only under its own layout (save with "
                             f"runtime.{dist_ckpt.FLAG_NAME}: true for one that loads under any)")
        unwrap(self.model).load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            with cpu_compat.cpu_device_mode():
                self.optimizer.load_state_dict(state["optimizer"])
                if self.settings.use_distributed_optimizer:
                    # Copies into fp32 main params that require grad: no autograd here.
                    with torch.no_grad():
                        _load_parameter_state_keeping_step(self.optimizer, self._param_state_file(path),
                                                           state.get("adam_step"))
        if isinstance(state["rng"], torch.Tensor):  # written before every stream was saved: CPU torch only
            torch.set_rng_state(state["rng"])
        else:
            restore_rng_state(state["rng"])

    def _load_scheduler(self, path: str) -> None:
        scheduler_file = os.path.join(path, SCHEDULER_FILE)
        if self.scheduler is not None and os.path.exists(scheduler_file):
            with open(scheduler_file) as f:
                self.scheduler.num_steps = 0
                self.scheduler.step(json.load(f)["num_steps"])

    def save_distributed_checkpoint(self, path: str) -> None:
        """Model weights only, via megatron dist_checkpointing: reloadable under any TP/PP layout."""
        info = self._checkpoint_info(dist_ckpt.FORMAT_DIST, weights_only=True)
        dist_ckpt.save_distributed(self.model, None, path, info)

    def load_distributed_checkpoint(self, path: str) -> None:
        """Model weights of a dist_checkpointing checkpoint (either kind), under any layout.

        The optimizer and RNG state stay as they are.
        """
        saved = dist_ckpt.read_checkpoint_info(path)
        if saved is None or saved["format"] != dist_ckpt.FORMAT_DIST:
            raise ValueError(f"{path} is not a dist_checkpointing checkpoint (format: "
                             f"{saved['format'] if saved else 'per-rank files'})")
        current = self._checkpoint_info(dist_ckpt.FORMAT_DIST, weights_only=True)
        dist_ckpt.check_checkpoint(path, saved, current)
        dist_ckpt.load_distributed(self.model, None, path, saved, current, restore_rng=False)

    @property
    def device(self) -> torch.device:
        return platform.torch_device()

    # -- memory (free_memory) -------------------------------------------------------
    def offload(self) -> None:
        """Weights, optimizer state (fp32 master weights, Adam moments) and gradient buffers
        to host memory, in place (see chatlearn/models/offload.py); on CPU nothing to do."""
        if self.model is None or not offload_target_available():
            return
        optimizers = [opt.optimizer for opt in optimizer_parts(self.optimizer)] if self.optimizer is not None else []
        self._host.offload(*model_tensors(self.model, optimizers))

    def onload(self) -> None:
        self._host.onload()


def _inner_states(optimizer) -> list[dict]:
    """The per-parameter state dicts of the torch optimizers inside a megatron optimizer."""
    return [st for opt in optimizer_parts(optimizer)
            for st in opt.optimizer.state.values()]


def _inner_steps(optimizer) -> Optional[torch.Tensor]:
    # torch Adam counts steps per parameter; they all advance together.
    steps = [st["step"] for st in _inner_states(optimizer) if "step" in st]
    return steps[0].clone() if steps else None


def _load_parameter_state_keeping_step(optimizer, filename: str, step: Optional[torch.Tensor]) -> None:
    """``load_parameter_state`` of megatron's distributed optimizer with plain torch Adam.

    Megatron saves only param / exp_avg / exp_avg_sq per parameter, but
    copies every key of the live state on load, so torch Adam's ``step``
    raises KeyError. Take ``step`` out for the load and put the saved one back.
    """
    for st in _inner_states(optimizer):
        st.pop("step", None)
    optimizer.load_parameter_state(filename)
    if step is not None:
        for st in _inner_states(optimizer):
            st["step"] = step.clone()


def _token_mask(micro_batch: dict) -> torch.Tensor:
    """The tokens a loss counts: ``loss_mask``, else every real token after the first."""
    mask = micro_batch.get("loss_mask")
    if mask is not None:
        return mask
    ids = micro_batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    return (positions < micro_batch["seq_lens"][:, None]) & (positions > 0)


def _set_global_totals(micro_batches: list[dict]) -> None:
    """Put the global batch's response-token and sample counts into every micro-batch
    (this rank's counts, summed over the data-parallel ranks), for ``LossAggregator``."""
    from megatron.core import parallel_state as ps

    tokens, samples = 0.0, 0.0
    for mb in micro_batches:
        valid = mb.get(SAMPLE_VALID, torch.ones(mb["input_ids"].shape[0])).float()
        tokens += float((_token_mask(mb).float() * valid[:, None]).sum())
        samples += float(valid.sum())
    totals = torch.tensor([tokens, samples], dtype=torch.float64, device=platform.torch_device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    tokens, samples = totals.tolist()
    for mb in micro_batches:
        mb[GLOBAL_NUM_TOKENS], mb[GLOBAL_NUM_SAMPLES] = torch.tensor(tokens), torch.tensor(samples)


def _sum_over_data_parallel(results: list[dict]) -> dict[str, float]:
    """Each metric's shares summed over this rank's micro-batches and all data-parallel ranks."""
    from megatron.core import parallel_state as ps

    keys = sorted(results[0])
    sums = torch.tensor([sum(float(torch.as_tensor(r[k]).float()) for r in results) for k in keys],
                        dtype=torch.float64, device=platform.torch_device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
    return dict(zip(keys, sums.tolist()))
