"""The module base class users subclass for every model role.

One class serves both sides of the engine:

* In the driver, the object is a handle: the engine binds it to its Ray
  workers, and calling ``policy.forward_step(batch)`` inside a flow sends the
  batch to a replica and returns at once with a ``RemoteBatch``.
* In each worker (one Ray actor per rank), the engine builds a fresh instance
  of the same class and calls the user's methods on real data.

How a method is spread over a model's workers is declared once, in
``dispatch_modes`` (or with the ``@dispatch`` decorator for extra methods):

    round_robin     the whole call goes to every rank of one replica, replicas
                    taken in turn; the output comes from the replica's output
                    rank (the last pipeline stage).
    data_parallel   every rank gets the micro-batches of its data-parallel rank.
    all_ranks       every rank of every replica gets the same arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import torch

    from chatlearn.config.schema import ChatLearnConfig, ModelConfig, RuntimeConfig

ROUND_ROBIN = "round_robin"
DATA_PARALLEL = "data_parallel"
ALL_RANKS = "all_ranks"
DISPATCH_MODES = (ROUND_ROBIN, DATA_PARALLEL, ALL_RANKS)


def dispatch(mode: str) -> Callable:
    """Declare how a custom module method is spread over the workers."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"dispatch mode must be one of {DISPATCH_MODES}, got {mode!r}")

    def mark(fn: Callable) -> Callable:
        fn._chatlearn_dispatch = mode
        return fn

    return mark


@dataclass(frozen=True)
class WorkerInfo:
    """Where one worker sits inside its model (set before ``setup()``)."""

    replica_id: int
    rank: int  # rank inside the replica's torch.distributed group
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        # Megatron's default rank order: tensor-parallel fastest, then data, then pipeline.
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)


class BaseModule:
    """A model role: policy, reference, reward, value, a trainer, or your own.

    Override what your role needs:
      setup()                              build the model (runs in each worker)
      forward_step(data, iteration)        inference roles: batch dict in, dict out
      train_step(data_list, iteration)     trainers: list of micro-batches in, metrics out
      build_dataset(prompts, is_eval)      turn raw prompts into samples
      save_checkpoint(path) / load_checkpoint(path)
      named_parameters_for_sync() / load_parameters_from_sync(params)   weight sync
      offload() / onload()                 free memory while idle (free_memory: True)
      before_episode(episode) / after_episode(episode)
    """

    dispatch_modes: dict[str, str] = {
        "forward_step": ROUND_ROBIN,
        "eval_forward": ROUND_ROBIN,
        "train_step": DATA_PARALLEL,
    }

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a model needs a non-empty name (its key under models:), got {name!r}")
        self.name = name
        self.worker: Optional[WorkerInfo] = None  # set in workers only
        self._dist = None  # set in the driver by the engine (chatlearn.runtime.dist_model.DistModel)

    # -- configuration ----------------------------------------------------------
    @property
    def global_args(self) -> "ChatLearnConfig":
        from chatlearn.config.globals import get_args

        return get_args()

    @property
    def module_args(self) -> "ModelConfig":
        """This model's entry under ``models:``."""
        return self.global_args.models[self.name]

    @property
    def model_args(self) -> dict[str, Any]:
        """Free-form backend arguments from the model's ``model_config_file``."""
        return self.module_args.args_dict

    @property
    def runtime_args(self) -> "RuntimeConfig":
        return self.global_args.runtime

    @property
    def num_replica(self) -> int:
        if self._dist is None:
            raise RuntimeError(f"model {self.name!r} is not placed yet: build an engine with it first")
        return self._dist.num_replicas

    @classmethod
    def dispatch_mode(cls, method: str) -> Optional[str]:
        """How ``method`` is spread over workers, or None if it is not remote."""
        for klass in cls.__mro__:
            fn = klass.__dict__.get(method)
            if fn is not None and hasattr(fn, "_chatlearn_dispatch"):
                return fn._chatlearn_dispatch
        for klass in cls.__mro__:
            modes = klass.__dict__.get("dispatch_modes", {})
            if method in modes:
                return modes[method]
        return None

    @classmethod
    def remote_methods(cls) -> list[str]:
        """Methods the driver calls on workers (those with a dispatch mode)."""
        names = set()
        for klass in cls.__mro__:
            names.update(klass.__dict__.get("dispatch_modes", {}))
            names.update(n for n, fn in klass.__dict__.items() if hasattr(fn, "_chatlearn_dispatch"))
        return sorted(names)

    # -- user hooks (worker side) -----------------------------------------------
    def setup(self) -> None:
        """Build models, tokenizers and optimizers. Runs once in every worker."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) does not implement forward_step")

    def eval_forward(self, data: dict, iteration: int) -> dict:
        return self.forward_step(data, iteration)

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) does not implement train_step")

    def build_dataset(self, prompts: list, is_eval: bool = False):
        """Turn raw prompts into a list (or torch Dataset) of sample dicts."""
        return [p if isinstance(p, dict) else {"prompt": p} for p in prompts]

    def save_checkpoint(self, path: str) -> None:
        """Save this rank's state under ``path`` (a directory for this model)."""

    def load_checkpoint(self, path: str) -> None:
        """Load what ``save_checkpoint`` wrote under ``path``."""

    def named_parameters_for_sync(self, device: str = "cpu") -> dict[str, "torch.Tensor"]:
        """Full weights, named in Hugging Face terms, for the parameter sync (on ``device``:
        "cpu", or "cuda" for the GPU-to-GPU transport)."""
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) cannot send weights")

    def load_parameters_from_sync(self, params: dict[str, "torch.Tensor"]) -> None:
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) cannot receive weights")

    def parameter_checksums(self) -> dict[str, tuple[float, ...]]:
        """Position-sensitive checksum records in float64 per parameter, for validate_param_sync
        (``chatlearn/synchronizer/checksums.py``): (sum, sum |x|, position-weighted sum,
        position-weighted sum |x|, unit roundoff of the dtype). Every rank exports (the
        export may be collective); only output ranks compute (the driver reads theirs)."""
        from chatlearn.synchronizer.checksums import state_records

        state = self.named_parameters_for_sync()
        return state_records(state) if self.is_output_rank() else {}

    def probe_vocab_size(self) -> Optional[int]:
        """Token ids below this are valid inputs of :meth:`probe_outputs` (None: cannot probe)."""
        embeddings = getattr(getattr(self, "model", None), "get_input_embeddings", None)
        return int(embeddings().num_embeddings) if callable(embeddings) else None

    def probe_outputs(self, token_ids) -> Optional["torch.Tensor"]:
        """The probe of validate_param_sync: ``[b, s]`` log-probs of ``token_ids`` under the
        model (position t: log p(token t | tokens < t), position 0: 0), fp32 on the host.

        This default serves a ``self.model`` that is a Hugging Face causal LM (a
        ``TorchModule`` around ``AutoModelForCausalLM``), run in eval mode; it returns None
        (the pair is validated by checksums only) for anything else. Backends override it.
        """
        import torch

        model = getattr(self, "model", None)
        if self.probe_vocab_size() is None or not isinstance(model, torch.nn.Module):
            return None
        device = next(model.parameters()).device
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=device)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = getattr(model(input_ids=ids), "logits", None)
        finally:
            model.train(training)
        if logits is None or logits.dim() != 3:
            return None  # e.g. a sequence classifier's pooled scores: nothing per token to compare
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.nn.functional.pad(logp, (1, 0), value=0.0).cpu()

    def is_output_rank(self) -> bool:
        """Whether this rank's forward output is the replica's output."""
        info = self.worker
        return info is None or info.rank == info.world_size - 1

    def offload(self) -> None:
        """Release weights/optimizer/grad memory while the model is idle."""

    def onload(self) -> None:
        """Bring back what ``offload`` released."""

    def before_episode(self, episode: int) -> None:
        pass

    def after_episode(self, episode: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
