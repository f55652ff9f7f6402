"""Running micro-batches through a (pipelined) Megatron GPTModel.

Thin wrappers around megatron's ``get_forward_backward_func``: the pipeline
schedule (1F1B with PP > 1, a plain loop otherwise) moves activations
between stages; the callables here only say what goes in on the first
stage and what to do with the logits on the last one.

A micro-batch is a dict with ``input_ids`` ([b, s] long) and any extra
tensors a loss function needs. With pipeline parallelism all micro-batches of
one call must share ``[b, s]``: the pipeline's p2p buffers have a fixed shape.
Callers get equal row counts from ``chatlearn.data.batching.split_global_batch``
and equal lengths from :func:`pad_micro_batches`. Without it, :func:`group_by_length`
sorts the rows by length so that each micro-batch is padded only to its own
longest row.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from chatlearn.algorithms.core import sampling_logprobs_and_entropy, sampling_params
from chatlearn.algorithms.vocab_parallel import gather_vocab
from chatlearn.models.megatron import cpu_compat
from chatlearn.utils import platform

# loss_fn(logits, micro_batch) -> (scalar loss, metrics dict of floats/tensors). A causal LM's
# logits are this TP rank's vocabulary slice [b, s, V / TP] (vocab-parallel, see vocab_group),
# a score model's its head's [b, s, num_labels]; in the model's dtype.
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def pad_micro_batches(micro_batches: list[dict], pad_id: int = 0) -> list[dict]:
    """Right-pad every ``input_ids`` (and same-shaped [b, s] tensors) to the longest length.

    Right padding does not change the logits of the real tokens (causal
    attention), so no attention mask is needed. A ``seq_lens`` entry keeps
    the unpadded lengths if it is not there already.
    """
    length = max(mb["input_ids"].shape[1] for mb in micro_batches)
    out = []
    for mb in micro_batches:
        b, s = mb["input_ids"].shape
        new = dict(mb)
        new.setdefault("seq_lens", torch.full((b,), s, dtype=torch.long))
        if s < length:
            for key, value in mb.items():
                if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (b, s):
                    fill = pad_id if key == "input_ids" else 0
                    new[key] = torch.nn.functional.pad(value, (0, length - s), value=fill)
        out.append(new)
    return out


def row_lengths(mb: dict) -> torch.Tensor:
    """``[b]`` real length of each row: up to its last ``attention_mask`` (else ``loss_mask``) position;
    the full width when the micro-batch has neither (nothing says where a row ends)."""
    b, s = mb["input_ids"].shape
    mask = mb.get("attention_mask", mb.get("loss_mask"))
    if not isinstance(mask, torch.Tensor) or mask.shape != (b, s):
        return torch.full((b,), s, dtype=torch.long)
    positions = torch.arange(1, s + 1).expand(b, s)
    return torch.where(mask > 0, positions, 0).max(dim=1).values.clamp(min=1)


def group_by_length(micro_batches: list[dict], pad_id: int = 0) -> tuple[list[dict], torch.Tensor]:
    """The rows of ``micro_batches``, sorted by ``row_lengths`` into as many micro-batches of the same
    row count, each cut to its own longest row; and, for each new row, its index in the input.

    For runs without pipeline parallelism: a long response no longer pads every micro-batch
    to its length. Losses and log-probs are unchanged (rows only move between micro-batches;
    what is cut is padding, past every row's mask), except for the order of float sums.
    """
    if not micro_batches:
        return [], torch.zeros(0, dtype=torch.long)
    padded = pad_micro_batches(micro_batches, pad_id)
    rows_per_mb = padded[0]["input_ids"].shape[0]
    keys = [k for k, v in padded[0].items() if isinstance(v, torch.Tensor) and v.dim() >= 1
            and v.shape[0] == rows_per_mb]
    merged = {k: torch.cat([mb[k] for mb in padded]) for k in keys}
    width = merged["input_ids"].shape[1]
    lengths = torch.cat([row_lengths(mb) for mb in padded])
    order = torch.sort(lengths, stable=True).indices
    out = []
    for start in range(0, len(order), rows_per_mb):
        rows = order[start:start + rows_per_mb]
        cut = int(lengths[rows].max())
        mb = {k: v for k, v in padded[0].items() if k not in keys}  # per-batch values (e.g. totals)
        for k, v in merged.items():
            v = v[rows]
            mb[k] = v[:, :cut] if v.dim() >= 2 and v.shape[1] == width else v
        mb["seq_lens"] = mb["seq_lens"].clamp(max=cut)
        out.append(mb)
    return out, order


def vocab_group() -> Any:
    """The process group a causal LM's logits are split over (the tensor-parallel group), None
    with TP 1. Pass it as ``group=`` to ``chatlearn.algorithms.core.sampling_logprobs`` /
    ``entropy_from_logits`` (or use :func:`micro_batch_logprobs_and_entropy`)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


@functools.lru_cache(maxsize=None)
def _float16_module_has_fp32_output() -> bool:
    """Whether this megatron-core's ``Float16Module.forward`` takes ``fp32_output`` (looked up once,
    not on every schedule run)."""
    import inspect

    from megatron.core.transformer.module import Float16Module

    return "fp32_output" in inspect.signature(Float16Module.forward).parameters


def _keeps_half_precision_output(model: torch.nn.Module) -> dict:
    """``fp32_output=False`` for a model under megatron's ``Float16Module`` (GPU, bf16/fp16):
    by default it would cast the last stage's logits to a full fp32 copy; the log-prob code
    converts a chunk at a time instead. ``{}`` for any other model."""
    from megatron.core.transformer.module import Float16Module

    if not _float16_module_has_fp32_output():
        return {}  # a megatron-core without the switch: its fp32 copy stays
    while model is not None:
        if isinstance(model, Float16Module):
            return {"fp32_output": False}
        model = getattr(model, "module", None)
    return {}


def _on_device(mb: dict, device: torch.device) -> dict:
    """``mb`` with its ``[b, ...]`` tensors on ``device``, all copied before the schedule runs.

    On a GPU, every host-to-device ``.to()`` inside a loss would wait for the device to finish
    its queue, so the host could never launch one micro-batch while the GPU runs another.
    What needs host values stays on the host: 0-dim tensors (the global batch totals a loss
    reads with ``float()``), and top-k/top-p settings that are off on every row are left out
    (``sampling_logprobs`` would otherwise look at them on the device)."""
    out = {}
    for key, value in mb.items():
        if key == "sampling_top_k" and isinstance(value, torch.Tensor) and bool((value <= 0).all()):
            continue
        if key == "sampling_top_p" and isinstance(value, torch.Tensor) and bool((value >= 1).all()):
            continue
        moves = isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != device
        out[key] = value.to(device, non_blocking=True) if moves else value
    return out


def _model_inputs(mb: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = mb["input_ids"].to(device)
    b, s = input_ids.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    return input_ids, position_ids


def run_micro_batches(
    model: torch.nn.Module,
    micro_batches: list[dict],
    on_logits: Callable[[torch.Tensor, dict], Any],
    forward_only: bool,
) -> list[Any]:
    """Run the schedule; return ``on_logits``' results per micro-batch on the last stage, else [].

    With ``forward_only=False``, ``on_logits`` must return ``(loss, metrics)``
    and gradients are accumulated into the model (``loss`` is divided by the
    number of micro-batches by megatron's schedule).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    shapes = [mb["input_ids"].shape for mb in micro_batches]
    if ps.get_pipeline_model_parallel_world_size() > 1 and len(set(shapes)) > 1:
        raise ValueError("with pipeline parallelism all micro-batches of one call need the same [batch, seq] "
                         "shape: pad them first (pad_micro_batches)")
    device = platform.torch_device()
    batches = iter([_on_device(mb, device) for mb in micro_batches])
    output_kwargs = _keeps_half_precision_output(model)

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        input_ids, position_ids = _model_inputs(mb, device)
        # attention_mask None: the local attention applies its causal mask.
        logits = chunk(input_ids, position_ids, None, **output_kwargs)
        if not ps.is_pipeline_last_stage():
            return logits, None

        # The schedule passes non_loss_data=True when collecting forward-only outputs.
        def reduce(output, non_loss_data: bool = False):
            result = on_logits(output, mb)
            if forward_only:
                return result
            loss, metrics = result
            # The schedule divides the returned loss in place (by the number of
            # micro-batches); metrics holding loss.detach() would share storage.
            metrics = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
            return loss, metrics

        return logits, reduce

    with cpu_compat.cpu_device_mode():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=max(shape[1] for shape in shapes),
            micro_batch_size=shapes[0][0],
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
    return list(results) if ps.is_pipeline_last_stage() else []


def micro_batch_logprobs(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    """Token log-probs [b, s] of one micro-batch: the first half of
    :func:`micro_batch_logprobs_and_entropy`."""
    return micro_batch_logprobs_and_entropy(logits, mb)[0]


def micro_batch_logprobs_and_entropy(logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs [b, s] of one micro-batch from a causal LM's vocab-parallel logits, of
    the sampling distribution its rows carry (``SAMPLING_KEYS``; top-k/top-p at its
    ``loss_mask`` positions), else of the softmax; and the per-token entropy [b, s] of the
    tempered next-token distribution. One pass over the logits; collective over the TP group
    (``chatlearn.algorithms.core.sampling_logprobs_and_entropy``)."""
    return sampling_logprobs_and_entropy(logits, mb["input_ids"], **sampling_params(mb), mask=mb.get("loss_mask"),
                                         group=vocab_group())


def forward_logprobs(model: torch.nn.Module, micro_batches: list[dict]) -> Optional[torch.Tensor]:
    """Token log-probs [sum b, s] of all micro-batches on the last stage (None elsewhere),
    aligned with ``input_ids``: position t holds log p(token t | tokens < t), position 0 holds 0
    (see ``micro_batch_logprobs``)."""
    model.eval()
    with torch.no_grad():
        outs = run_micro_batches(model, micro_batches, micro_batch_logprobs, forward_only=True)
    return _cat_rows([o.cpu() for o in outs]) if outs else None


def forward_logits(model: torch.nn.Module, micro_batches: list[dict]) -> Optional[torch.Tensor]:
    """The model's outputs [sum b, s, V] in fp32 on the last stage, None elsewhere: a causal
    LM's full-vocabulary logits (gathered over TP: large; for tests and debugging), a score
    model's head outputs [sum b, s, num_labels]."""
    from chatlearn.models.megatron.model import vocab_parallel_output

    group = vocab_group() if vocab_parallel_output(model) else None
    model.eval()
    with torch.no_grad():
        outs = run_micro_batches(model, micro_batches, lambda logits, mb: gather_vocab(logits, group).float().cpu(),
                                 forward_only=True)
    return _cat_rows(outs) if outs else None


def _cat_rows(outs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-micro-batch ``[b, s_i, ...]`` outputs along rows, right-padding with zeros."""
    width = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, 0) * (o.dim() - 2) + (0, width - o.shape[1])) for o in outs])
