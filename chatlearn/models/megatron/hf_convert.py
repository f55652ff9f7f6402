"""Hugging Face <-> Megatron weight conversion for Llama / Qwen2 / Qwen3 GPT models.

The mapping is data, not code per model: :data:`LAYER_RULES` and
:data:`GLOBAL_RULES` list, for every Megatron parameter, the HF tensors it is
made of and the *layout* that relates them. A layout knows how to cut full
HF tensors into one tensor-parallel shard (:meth:`Layout.shard`) and how to
put the gathered shards back together (:meth:`Layout.unshard`):

    replicated  norms: every TP rank holds the full tensor
    rows        dim 0 split (embeddings, output layer: vocab-parallel)
    cols        dim 1 split (linear_proj, linear_fc2: row-parallel linears)
    qkv         [q heads of group g | k_g | v_g] per kv group g, whole groups per rank
    gate_up     linear_fc1 on rank r is [gate_r ; up_r]

Loading reads only the HF tensors the rank's pipeline stage needs.
Exporting is collective over the TP and PP groups and gives every rank the
same full HF state dict.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from chatlearn.models.megatron.model import HFArch, hf_arch, unwrap
from chatlearn.utils import platform


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How full HF tensors map to one TP rank's Megatron tensor and back."""

    name: str
    shard: Callable[[list[torch.Tensor], int, int, HFArch], torch.Tensor]
    unshard: Callable[[list[torch.Tensor], HFArch], list[torch.Tensor]]


def _qkv_full(parts: list[torch.Tensor], arch: HFArch) -> torch.Tensor:
    """Interleave HF q, k, v (weights [n*d, h] or biases [n*d]) per kv group."""
    q, k, v = parts
    ng, d = arch.num_kv_heads, arch.head_dim
    tail = q.shape[1:]
    q = q.reshape(ng, arch.heads_per_group * d, *tail)
    k = k.reshape(ng, d, *tail)
    v = v.reshape(ng, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_split(full: torch.Tensor, arch: HFArch) -> list[torch.Tensor]:
    ng, hpg, d = arch.num_kv_heads, arch.heads_per_group, arch.head_dim
    tail = full.shape[1:]
    grouped = full.reshape(ng, hpg + 2, d, *tail)
    q = grouped[:, :hpg].reshape(-1, *tail)
    k = grouped[:, hpg].reshape(-1, *tail)
    v = grouped[:, hpg + 1].reshape(-1, *tail)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("replicated", lambda p, r, t, a: p[0], lambda s, a: [s[0]]),
        Layout("rows", lambda p, r, t, a: p[0].chunk(t, 0)[r], lambda s, a: [torch.cat(s, 0)]),
        Layout("cols", lambda p, r, t, a: p[0].chunk(t, 1)[r], lambda s, a: [torch.cat(s, 1)]),
        # Groups are contiguous in the interleaved tensor, so a dim-0 chunk is whole groups.
        Layout("qkv", lambda p, r, t, a: _qkv_full(p, a).chunk(t, 0)[r],
               lambda s, a: _qkv_split(torch.cat(s, 0), a)),
        Layout("gate_up", lambda p, r, t, a: torch.cat([p[0].chunk(t, 0)[r], p[1].chunk(t, 0)[r]], 0),
               lambda s, a: [torch.cat([x.chunk(2, 0)[0] for x in s], 0),
                             torch.cat([x.chunk(2, 0)[1] for x in s], 0)]),
    )
}


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter (name suffix) <- HF tensors, via a layout."""

    megatron: str
    hf: tuple[str, ...]
    layout: str
    when: Callable[[HFArch], bool] = lambda arch: True


# Per decoder layer; "{i}" is the global layer index. ``when`` picks the
# rules an architecture uses (model.py's HFArch says which parts it has).
_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    Rule("self_attention.linear_qkv.weight", tuple(f"{_ATTN}{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule("self_attention.linear_qkv.bias", tuple(f"{_ATTN}{p}_proj.bias" for p in "qkv"), "qkv",
         when=lambda arch: arch.qkv_bias),
    # Qwen3's per-head RMSNorm on q and k (head_dim wide, the same on every TP rank).
    Rule("self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",), "replicated",
         when=lambda arch: arch.qk_norm),
    Rule("self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",), "replicated",
         when=lambda arch: arch.qk_norm),
    Rule("self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",), "cols"),
    # A row-parallel linear adds its whole bias once, after the reduction.
    Rule("self_attention.linear_proj.bias", (_ATTN + "o_proj.bias",), "replicated",
         when=lambda arch: arch.linear_bias),
    Rule("pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    Rule("mlp.linear_fc1.weight", (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"), "gate_up"),
    Rule("mlp.linear_fc1.bias", (_MLP + "gate_proj.bias", _MLP + "up_proj.bias"), "gate_up",
         when=lambda arch: arch.linear_bias),
    Rule("mlp.linear_fc2.weight", (_MLP + "down_proj.weight",), "cols"),
    Rule("mlp.linear_fc2.bias", (_MLP + "down_proj.bias",), "replicated", when=lambda arch: arch.linear_bias),
)

# Outside the decoder layers. With tied embeddings and PP > 1 the last stage
# keeps its own copy of the embedding as output_layer.weight: it is loaded
# from embed_tokens but not exported again (the first stage exports it).
GLOBAL_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "rows"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "rows",
         when=lambda arch: not arch.tie_word_embeddings and not arch.num_labels),
    Rule("output_layer.weight", ("model.embed_tokens.weight",), "rows",
         when=lambda arch: arch.tie_word_embeddings and not arch.num_labels),
    # Reward / value models: the replicated ScoreHead.
    Rule("output_layer.weight", ("score.weight",), "replicated", when=lambda arch: bool(arch.num_labels)),
)


def _exported(rule: Rule, arch: HFArch) -> bool:
    return not (rule.megatron == "output_layer.weight" and arch.tie_word_embeddings)


def local_param_rules(model: torch.nn.Module, arch: HFArch) -> list[tuple[str, torch.Tensor, torch.Tensor, Rule, dict]]:
    """(megatron name, parameter, value to export, rule, format args) per parameter of this stage.

    A LoRA-wrapped linear (lora.py) appears under its plain name: loading
    writes its frozen base weight, exporting sends the merged ``W + s*B@A``.
    """
    gpt = unwrap(model)
    modules = dict(gpt.named_modules())
    out = []
    for name, param in gpt.named_parameters():
        if ".lora_" in name:
            continue
        value = param
        if ".base." in name:
            owner_name, _, leaf = name.rpartition(".base.")
            owner = modules[owner_name]
            value = owner.merged_weight() if leaf == "weight" else param
            name = f"{owner_name}.{leaf}"
        rule, fmt = _match(name, arch, gpt)
        out.append((name, param, value, rule, fmt))
    return out


def _match(name: str, arch: HFArch, gpt: torch.nn.Module) -> tuple[Rule, dict]:
    if name.startswith("decoder.layers."):
        local_idx, suffix = name[len("decoder.layers."):].split(".", 1)
        # layer_number is 1-based and global (includes the pipeline offset).
        global_idx = gpt.decoder.layers[int(local_idx)].layer_number - 1
        rules, fmt = LAYER_RULES, {"i": global_idx}
    else:
        suffix, rules, fmt = name, GLOBAL_RULES, {}
    for rule in rules:
        if rule.megatron == suffix and rule.when(arch):
            return rule, fmt
    raise KeyError(f"no HF mapping for Megatron parameter {name!r} ({arch.model_type})")


# ---------------------------------------------------------------------------
# Reading HF checkpoints
# ---------------------------------------------------------------------------

class HFCheckpointReader:
    """Lazy access to the tensors of a HF checkpoint dir (safetensors or torch .bin).

    Sharded checkpoints are resolved through their ``*.index.json``; only
    the files that hold requested tensors are opened.
    """

    def __init__(self, model_dir: Union[str, os.PathLike]):
        self.model_dir = os.fspath(model_dir)
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"HF checkpoint directory not found: {self.model_dir}")
        self._open: dict[str, Any] = {}
        self.key_to_file = self._index()

    def _index(self) -> dict[str, str]:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = os.path.join(self.model_dir, index_name)
            if os.path.isfile(index):
                with open(index) as f:
                    return {k: os.path.join(self.model_dir, v) for k, v in json.load(f)["weight_map"].items()}
            path = os.path.join(self.model_dir, single)
            if os.path.isfile(path):
                return {k: path for k in self._keys_of(path)}
        raise FileNotFoundError(
            f"no weights in {self.model_dir}: expected model.safetensors, pytorch_model.bin or an index.json"
        )

    def _keys_of(self, path: str) -> Iterable[str]:
        return self._handle(path).keys()

    def _handle(self, path: str) -> Any:
        if path not in self._open:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[path] = safe_open(path, framework="pt", device="cpu")
            else:
                self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[path]

    def keys(self) -> Iterable[str]:
        return self.key_to_file.keys()

    def get(self, key: str) -> torch.Tensor:
        path = self.key_to_file.get(key)
        if path is None:
            raise KeyError(f"tensor {key!r} not found in HF checkpoint {self.model_dir}")
        handle = self._handle(path)
        return handle.get_tensor(key) if path.endswith(".safetensors") else handle[key]

    def where(self, key: str) -> str:
        return self.key_to_file.get(key, self.model_dir)


class DictReader:
    """The reader interface over an in-memory HF state dict (weight sync)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], origin: str = "weight sync"):
        self.state_dict = state_dict
        self.origin = origin

    def keys(self) -> Iterable[str]:
        return self.state_dict.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.state_dict:
            raise KeyError(f"tensor {key!r} not found in {self.origin}")
        return self.state_dict[key]

    def where(self, key: str) -> str:
        return self.origin


# ---------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------

def load_hf_weights(model: torch.nn.Module, hf_config: Union[dict, Any],
                    source: Union[str, os.PathLike, Mapping[str, torch.Tensor], HFCheckpointReader, DictReader],
                    strict: bool = True) -> None:
    """Copy HF weights into this rank's TP/PP shard of ``model``.

    ``source`` is a HF checkpoint dir, a reader, or a full HF state dict.
    Every shape is checked before anything is copied, so a wrong checkpoint
    leaves the model untouched and the error names the file and key.
    With ``strict``, HF tensors of this stage's layers that no rule consumes
    (say, a checkpoint of another architecture) are an error too.
    """
    from megatron.core import parallel_state as ps

    arch = hf_arch(hf_config)
    if isinstance(source, (str, os.PathLike)):
        reader = HFCheckpointReader(source)
    elif isinstance(source, Mapping):
        reader = DictReader(source)
    else:
        reader = source
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()

    planned: list[tuple[torch.Tensor, torch.Tensor]] = []
    used: set[str] = set()
    for name, param, _, rule, fmt in local_param_rules(model, arch):
        keys = [k.format(**fmt) for k in rule.hf]
        parts = [reader.get(k) for k in keys]
        used.update(keys)
        _check_hf_shapes(keys, parts, arch, reader)
        shard = LAYOUTS[rule.layout].shard(parts, tp_rank, tp, arch)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"{keys} from {reader.where(keys[0])} give a {tuple(shard.shape)} shard for Megatron "
                f"parameter {name!r}, which is {tuple(param.shape)}"
            )
        planned.append((param, shard))
    if strict:
        _check_unused(reader, used, arch, model)
    with torch.no_grad():
        for param, shard in planned:
            param.copy_(shard.to(dtype=param.dtype, device=param.device))


def expected_hf_shapes(arch: HFArch) -> dict[str, tuple[int, ...]]:
    """Full HF tensor shapes of a layer (with ``{i}``) and the globals."""
    h, d = arch.hidden_size, arch.head_dim
    nq, nkv, f, v = arch.num_heads * d, arch.num_kv_heads * d, arch.ffn_hidden_size, arch.vocab_size
    layer = "model.layers.{i}."
    attn, mlp = layer + "self_attn.", layer + "mlp."
    shapes = {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        "score.weight": (arch.num_labels, h),
        layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,),
        attn + "q_proj.weight": (nq, h), attn + "k_proj.weight": (nkv, h), attn + "v_proj.weight": (nkv, h),
        attn + "o_proj.weight": (h, nq), attn + "q_proj.bias": (nq,), attn + "k_proj.bias": (nkv,),
        attn + "v_proj.bias": (nkv,), attn + "o_proj.bias": (h,),
        attn + "q_norm.weight": (d,), attn + "k_norm.weight": (d,),
        mlp + "gate_proj.weight": (f, h), mlp + "up_proj.weight": (f, h), mlp + "down_proj.weight": (h, f),
        mlp + "gate_proj.bias": (f,), mlp + "up_proj.bias": (f,), mlp + "down_proj.bias": (h,),
    }
    return shapes


def _template(key: str) -> str:
    parts = key.split(".")
    if key.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit():
        parts[2] = "{i}"
    return ".".join(parts)


def _check_hf_shapes(keys: list[str], parts: list[torch.Tensor], arch: HFArch, reader: Any) -> None:
    shapes = expected_hf_shapes(arch)
    for key, tensor in zip(keys, parts):
        want = shapes.get(_template(key))
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(
                f"tensor {key!r} in {reader.where(key)} has shape {tuple(tensor.shape)}, "
                f"but config.json ({arch.model_type}) implies {want}"
            )


def _check_unused(reader: Any, used: set[str], arch: HFArch, model: torch.nn.Module) -> None:
    """HF tensors of this stage's layers that nothing consumed mean a different architecture."""
    gpt = unwrap(model)
    own_layers = {str(layer.layer_number - 1) for layer in gpt.decoder.layers}
    unused = []
    for key in reader.keys():
        if key in used or key.endswith("rotary_emb.inv_freq"):
            continue
        parts = key.split(".")
        if key.startswith("model.layers.") and parts[2] in own_layers:
            unused.append(key)
    if unused:
        raise ValueError(
            f"HF checkpoint {reader.where(unused[0])} has tensors a {arch.model_type} model does not use, "
            f"e.g. {unused[:3]}: is it a checkpoint of another architecture?"
        )


# ---------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------

def _comm_device() -> torch.device:
    # NCCL only moves GPU tensors; gloo only CPU ones.
    return platform.torch_device()


def _gather_tp(tensor: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [tensor.detach()]
    local = tensor.detach().to(_comm_device()).contiguous()
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
    return shards


def export_stage_hf_state_dict(model: torch.nn.Module, hf_config: Union[dict, Any],
                               device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Full HF tensors of this rank's pipeline stage (collective over the TP group), on ``device``."""
    arch = hf_arch(hf_config)
    out: dict[str, torch.Tensor] = {}
    for name, _, value, rule, fmt in local_param_rules(model, arch):
        shards = _gather_tp(value)
        if not _exported(rule, arch):
            continue
        for key, full in zip(rule.hf, LAYOUTS[rule.layout].unshard(shards, arch)):
            out[key.format(**fmt)] = full.to(device).contiguous()
    return out


def export_hf_state_dict(model: torch.nn.Module, hf_config: Union[dict, Any],
                         device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """The full model as a HF state dict, on every rank (collective over TP and PP).

    Each stage gathers its TP shards, then every stage broadcasts its tensors
    over the pipeline group in stage order, so all ranks return the same
    dict (tensors on ``device``, in the model's dtype, sorted by name).
    """
    from megatron.core import parallel_state as ps

    out = export_stage_hf_state_dict(model, hf_config, device)
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        group = ps.get_pipeline_model_parallel_group()
        my_stage = ps.get_pipeline_model_parallel_rank()
        comm = _comm_device()
        merged: dict[str, torch.Tensor] = {}
        for stage in range(pp):
            src = dist.get_global_rank(group, stage)
            meta = [[(k, tuple(t.shape), t.dtype) for k, t in out.items()] if stage == my_stage else None]
            dist.broadcast_object_list(meta, src=src, group=group, device=comm)
            for key, shape, dtype in meta[0]:
                buf = out[key].to(comm) if stage == my_stage else torch.empty(shape, dtype=dtype, device=comm)
                dist.broadcast(buf, src=src, group=group)
                merged[key] = buf.to(device)
        out = merged
    return dict(sorted(out.items()))


_TOKENIZER_AND_EXTRA_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                              "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt")


def save_hf_checkpoint(model: torch.nn.Module, hf_config: Union[dict, Any], out_dir: Union[str, os.PathLike],
                       source_dir: Optional[Union[str, os.PathLike]] = None,
                       dtype: Optional[torch.dtype] = None) -> None:
    """Write a HF checkpoint dir (safetensors + config + tokenizer) that transformers and vLLM load.

    Collective over all model-parallel ranks; global rank 0 writes. Tokenizer
    and generation config files are copied from ``source_dir`` when given.
    """
    from safetensors.torch import save_file

    state = export_hf_state_dict(model, hf_config)
    if dist.get_rank() == 0:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        cfg = dict(hf_config if isinstance(hf_config, dict) else hf_config.to_dict())
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        cfg["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
        tmp = os.path.join(out_dir, "model.safetensors.tmp")
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        if source_dir is not None:
            for name in _TOKENIZER_AND_EXTRA_FILES:
                src = os.path.join(os.fspath(source_dir), name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(out_dir, name))
    dist.barrier()


_SCORE_ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                        "qwen3": "Qwen3ForSequenceClassification"}


def make_score_checkpoint(causal_lm_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                          num_labels: int = 1, seed: int = 0, init_std: float = 0.02) -> str:
    """A reward/value model checkpoint (HF ``*ForSequenceClassification``) from a causal LM:
    the same backbone, the LM head dropped, a new ``score`` head (normal, ``init_std``)."""
    from safetensors.torch import save_file

    from chatlearn.models.megatron.model import load_hf_config

    cfg = load_hf_config(causal_lm_dir)
    arch = hf_arch(cfg)
    reader = HFCheckpointReader(causal_lm_dir)
    state = {k: reader.get(k).clone() for k in reader.keys() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(seed)
    dtype = state["model.embed_tokens.weight"].dtype
    state["score.weight"] = (init_std * torch.randn(num_labels, arch.hidden_size, generator=gen)).to(dtype)
    cfg.update(architectures=[_SCORE_ARCHITECTURES[arch.model_type]], tie_word_embeddings=False,
               id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
               label2id={f"LABEL_{i}": i for i in range(num_labels)})
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for name in _TOKENIZER_AND_EXTRA_FILES:
        src = os.path.join(os.fspath(causal_lm_dir), name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, name))
    return out_dir
