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

The engine calls every hook and flow method through :func:`call_hook`, which
passes each one the arguments its signature accepts: a ChatLearn 1.x override
such as ``before_episode(self)``, ``eval_forward(self, data)`` or
``save_checkpoint(self, iteration)`` runs unchanged (docs/migration.md).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from chatlearn.models.compat1x import ChatLearn1xHelpers

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


class HookSignatureError(TypeError):
    """A hook or flow method whose signature cannot take what the engine passes."""


def call_hook(fn: Callable, offered: Mapping[str, Any], *extra: Any) -> Any:
    """Call ``fn`` with the engine's ``offered`` arguments that its signature accepts.

    ``offered`` is ordered, in the engine's own convention (``data, iteration``;
    ``episode``; ``path, iteration``; ...); ``extra`` are arguments a flow passed
    explicitly, which ``fn`` must take. The rule, the same for every hook:

    1. an offered argument goes by name to the parameter of that name;
    2. the others fill ``fn``'s remaining *required* positional parameters in
       order (those left after the last ``len(extra)`` of them, which take
       ``extra``); offered arguments with no such parameter are not passed;
    3. ``fn(*args)``-style functions get everything positionally.

    So ``forward_step(data, iteration)``, ``forward_step(batch, it)`` and 1.x's
    ``eval_forward(data)`` all work; ``before_episode()`` gets no episode;
    ``save_checkpoint(iteration)`` (1.x) gets the training iteration, and
    ``save_checkpoint(path)`` the checkpoint directory.
    """
    names = tuple(offered)
    values = tuple(offered.values())
    plan = _call_plan(fn, names, len(extra))
    if plan is None:  # *args
        return fn(*values, *extra)
    positional, keywords = [], {}
    for param, source, index in plan:
        value = values[index] if source == "offered" else extra[index]
        if param is None:
            positional.append(value)
        else:
            keywords[param] = value
    return fn(*positional, **keywords)


def _call_plan(fn: Callable, names: tuple[str, ...], num_extra: int):
    func = getattr(fn, "__func__", fn)
    try:
        return _cached_plan(func, inspect.ismethod(fn), names, num_extra)
    except TypeError as err:  # unhashable callable: plan it every time
        if isinstance(err, HookSignatureError):
            raise
        return _plan(func, inspect.ismethod(fn), names, num_extra)


@functools.lru_cache(maxsize=4096)
def _cached_plan(func: Callable, bound: bool, names: tuple[str, ...], num_extra: int):
    return _plan(func, bound, names, num_extra)


def _plan(func: Callable, bound: bool, names: tuple[str, ...], num_extra: int):
    """``[(parameter name or None for positional, "offered"|"extra", index)]`` in call order,
    or None for a function taking ``*args``."""
    P = inspect.Parameter
    params = list(inspect.signature(func).parameters.values())
    if bound and params and params[0].kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
        params = params[1:]  # self
    if any(p.kind == P.VAR_POSITIONAL for p in params):
        return None
    named = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    by_name = {name: i for i, name in enumerate(names) if name in named}
    slots = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) and p.name not in by_name]
    required = [p for p in slots if p.default is P.empty]
    rest = [i for i in range(len(names)) if names[i] not in by_name]
    take = max(0, min(len(rest), len(required) - num_extra))
    assigned: dict[str, tuple[str, int]] = {name: ("offered", i) for name, i in by_name.items()}
    for param, i in zip(required[:take], rest[:take]):
        assigned[param.name] = ("offered", i)
    free = [p for p in slots if p.name not in assigned]
    if len(free) < num_extra:
        raise HookSignatureError(_signature_problem(func, names, num_extra, "takes too few arguments"))
    for param, i in zip(free, range(num_extra)):
        assigned[param.name] = ("extra", i)
    missing = [p.name for p in params if p.default is P.empty and p.name not in assigned
               and p.kind not in (P.VAR_KEYWORD,)]
    if missing:
        raise HookSignatureError(_signature_problem(func, names, num_extra, f"has no value for {missing}"))
    plan = []
    for p in params:
        if p.name in assigned:
            source, index = assigned[p.name]
            plan.append((None if p.kind == P.POSITIONAL_ONLY else p.name, source, index))
    return plan


def _signature_problem(func: Callable, names: tuple[str, ...], num_extra: int, problem: str) -> str:
    offered = ", ".join(names) + (f" and {num_extra} argument(s) from the flow" if num_extra else "")
    return (f"{getattr(func, '__qualname__', func)}{inspect.signature(func)} {problem}: the engine calls it "
            f"with ({offered}); see docs/migration.md (hook signatures)")


@dataclass(frozen=True)
class WorkerInfo:
    """Where one worker sits inside its model (set before ``setup()``)."""

    replica_id: int
    rank: int  # rank inside the replica's torch.distributed group
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    num_replicas: int = 1

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


class BaseModule(ChatLearn1xHelpers):
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

    Each hook may leave out arguments it does not use (``call_hook``), as ChatLearn
    1.x's hooks do. A trainer role that trains on keys an RL preset's driver-side
    step adds (PPO's ``advantages``/``returns``, ...) says so in ``needs_rollout_keys``;
    the preset then runs that step (``compute_advantages="auto"``).
    """

    dispatch_modes: dict[str, str] = {
        "forward_step": ROUND_ROBIN,
        "eval_forward": ROUND_ROBIN,
        "eval_step": ROUND_ROBIN,  # ChatLearn 1.x's name in its evaluator tutorials
        "train_step": DATA_PARALLEL,
    }

    # Keys this role trains on that an RL preset's driver-side rollout step adds, e.g.
    # ("advantages",) for a PPO policy trainer; empty: the role computes its own targets.
    needs_rollout_keys: tuple[str, ...] = ()

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a model needs a non-empty name (its key under models:), got {name!r}")
        self.name = name
        self.worker: Optional[WorkerInfo] = None  # set in workers only
        self._dist = None  # set in the driver by the engine (chatlearn.runtime.dist_model.DistModel)
        # Methods a flow calls that have no dispatch mode of their own (ChatLearn 1.x made every
        # method a flow calls remote): method -> mode, found when the flow is traced.
        self._flow_modes: dict[str, str] = {}
        # ChatLearn 1.x's per-module metrics: dicts appended here are averaged and logged once
        # per episode as ``<_metric_prefix>/<key>`` (get_and_clear_metrics).
        self._metric_list: list[dict] = []
        self._metric_prefix = ""
        self._padding_config: dict[str, dict[str, Any]] = {}

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

    def get_runtime_args(self) -> "RuntimeConfig":
        """ChatLearn 1.x's name for :attr:`runtime_args`."""
        return self.runtime_args

    @property
    def num_replica(self) -> int:
        if self.worker is not None:
            return self.worker.num_replicas
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

    def remote_modes(self) -> dict[str, str]:
        """This handle's remote methods and their modes: the class's, and those its flows call
        without a declared mode (``_flow_modes``)."""
        modes = {m: type(self).dispatch_mode(m) for m in type(self).remote_methods()}
        modes.update(getattr(self, "_flow_modes", {}))
        return modes

    def user_methods(self) -> list[str]:
        """Public methods defined outside the chatlearn package (the user's own classes), that
        have no dispatch mode: the ones a 1.x-style flow may call and make remote."""
        remote = set(type(self).remote_methods())
        names = set()
        for klass in type(self).__mro__:
            if klass is object or klass.__module__.split(".")[0] == "chatlearn":
                continue
            for name, value in klass.__dict__.items():
                if not name.startswith("_") and name not in remote and inspect.isfunction(value):
                    names.add(name)
        return sorted(names)

    # -- user hooks (worker side) -----------------------------------------------
    def init(self) -> None:
        """Runs once in every worker before ``setup()`` (ChatLearn 1.x's hook for environment
        set-up; ``torch.distributed`` is already initialized here)."""

    def setup(self) -> None:
        """Build models, tokenizers and optimizers. Runs once in every worker."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) does not implement forward_step")

    def eval_forward(self, data: dict, iteration: int) -> dict:
        return call_hook(self.forward_step, {"data": data, "iteration": iteration})

    def eval_step(self, data: dict, iteration: int) -> dict:
        """ChatLearn 1.x's other name for an evaluation stage; defaults to ``eval_forward``."""
        return call_hook(self.eval_forward, {"data": data, "iteration": iteration})

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

    def has_weights(self) -> bool:
        """Whether this rank holds weights a parameter sync can move. A module without (a
        rule-based reward, a TorchModule whose ``model`` is None) takes part in a sync as a
        no-op; the engine warns once per pair."""
        cls = type(self)
        return (cls.named_parameters_for_sync is not BaseModule.named_parameters_for_sync
                or cls.load_parameters_from_sync is not BaseModule.load_parameters_from_sync)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
