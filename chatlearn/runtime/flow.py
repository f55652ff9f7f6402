"""Flows: plain Python functions that call model methods, as in ChatLearn 1.x.

    def env_flow(batch):
        policy_out = policy.forward_step(batch)
        ref_out = reference.forward_step(policy_out)
        value_out = value.forward_step(policy_out)
        return reward.forward_step(policy_out, ref_out, value_out)

The engine finds the models a flow uses in the function's globals and
closure, checks them against the config before any worker starts, and traces
the flow once into a graph (which stage feeds which). At run time each call
returns at once with a future, so stages of different batches run
concurrently on different replicas, and a stage starts as soon as its inputs
exist. A flow may return several stage outputs (``return reward_out,
reward_out1``, as 1.x's flows do): the engine merges them, later wins.

As in ChatLearn 1.x, a flow may call any public method of a model: one with
no dispatch mode of its own becomes remote with the flow's default mode
(``round_robin`` in environment and evaluator flows, ``data_parallel`` in
trainer flows).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from chatlearn.models.base import DATA_PARALLEL, ROUND_ROBIN, BaseModule


class FlowError(ValueError):
    """A flow uses a model the config or the engine does not know, or calls it in a way
    the engine cannot run."""


@dataclass(frozen=True)
class FlowNode:
    model: str
    method: str
    inputs: tuple[str, ...]  # producer names: "input" or "model.method#k"
    name: str


@dataclass
class _Traced:
    node: str


class BaseFlow:
    kind = "flow"
    # The mode of a method the flow calls that declares none (ChatLearn 1.x's rule).
    default_mode = ROUND_ROBIN

    def __init__(self, flow_fn: Callable):
        if not callable(flow_fn):
            raise TypeError(f"{type(self).__name__} needs a function, got {type(flow_fn).__name__}")
        self.flow_fn = flow_fn
        self.graph: list[FlowNode] = []

    @property
    def fn_name(self) -> str:
        return getattr(self.flow_fn, "__qualname__", repr(self.flow_fn))

    def models(self) -> list[BaseModule]:
        """The model handles the flow function refers to (globals, closure, defaults)."""
        found: dict[int, BaseModule] = {}
        fn = inspect.unwrap(self.flow_fn)
        if inspect.ismethod(fn):
            _collect(vars(fn.__self__).values(), found)
            fn = fn.__func__
        try:
            refs = inspect.getclosurevars(fn)
        except TypeError:
            return []
        _collect(refs.nonlocals.values(), found)
        _collect(refs.globals.values(), found)
        _collect((fn.__defaults__ or ()), found)
        return list(found.values())

    def trace(self) -> list[FlowNode]:
        """Run the flow once on placeholders to record which stage feeds which.

        Methods without a dispatch mode that the flow calls with stage data become
        remote with ``default_mode`` (recorded in the model's ``_flow_modes``)."""
        models = self.models()
        saved = []
        counter: dict[str, int] = {}
        graph: list[FlowNode] = []
        found: dict[tuple[int, str], tuple[BaseModule, str]] = {}

        def recorder(model: BaseModule, method: str):
            def record(*inputs, **kwargs):
                names = tuple(x.node for x in inputs if isinstance(x, _Traced))
                key = f"{model.name}.{method}"
                counter[key] = counter.get(key, 0) + 1
                node = FlowNode(model.name, method, names or ("input",), f"{key}#{counter[key]}")
                graph.append(node)
                return _Traced(node.name)
            return record

        def probe(model: BaseModule, method: str, original: Callable):
            record = recorder(model, method)

            def call(*args, **kwargs):
                if not any(isinstance(a, _Traced) for a in (*args, *kwargs.values())):
                    return original(*args, **kwargs)  # a local helper call, not a stage
                found[(id(model), method)] = (model, method)
                return record(*args, **kwargs)
            return call

        try:
            for model in models:
                remote = model.remote_modes()
                for method in remote:
                    saved.append((model, method, model.__dict__.get(method)))
                    setattr(model, method, recorder(model, method))
                for method in model.user_methods():
                    if method not in remote:
                        saved.append((model, method, model.__dict__.get(method)))
                        setattr(model, method, probe(model, method, getattr(model, method)))
            out = self.flow_fn(_Traced("input"))
        finally:
            for model, method, previous in saved:
                if previous is None:
                    model.__dict__.pop(method, None)
                else:
                    setattr(model, method, previous)
        by_name = {model.name: model for model in models}
        for node in graph:  # a method made remote by another flow, with that flow's mode
            model = by_name[node.model]
            mode = getattr(model, "_flow_modes", {}).get(node.method, self.default_mode)
            if type(model).dispatch_mode(node.method) is None and mode != self.default_mode:
                raise FlowError(f"{self.kind} flow {self.fn_name}() calls {model.name}.{node.method}(), which "
                                f"another flow calls as {mode} and this one as {self.default_mode}: declare "
                                f"its mode with @dispatch(...) (chatlearn.models.base.dispatch)")
        for model, method in found.values():
            model._flow_modes = {**getattr(model, "_flow_modes", {}), method: self.default_mode}
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if self.kind != "trainer" and not all(isinstance(o, _Traced) and o.node != "input" for o in outputs):
            raise FlowError(f"{self.kind} flow {self.fn_name}() must return the output of a model call "
                            f"(or several, as a tuple)")
        self.graph = graph
        return graph

    def __call__(self, batch: Any):
        return self.flow_fn(batch)


class Environment(BaseFlow):
    """Produces experience: run once per batch of prompts."""

    kind = "environment"


class Trainer(BaseFlow):
    """Consumes experience: run once per global training batch."""

    kind = "trainer"
    default_mode = DATA_PARALLEL


class Evaluator(BaseFlow):
    """Runs on the evaluation prompts every ``eval_episode_interval`` episodes.

    Turning the flow's outputs into metrics (logged under ``eval/``), either:

    * ``set_post_process_func(fn)``: ``fn(results: list[dict], episode) -> dict``,
      ``results`` the output samples; or
    * ChatLearn 1.x's way: subclass and override ``post_process(results, eval_info)``
      (1.0.3), or ``set_post_process_func(fn)`` with ``fn(results, eval_info)``
      (1.0.2: a function whose second parameter is named ``eval_info``). ``results``
      is then ``{model name: [output batch, ...]}`` for each stage the flow returns,
      ``eval_info`` ``{"episode_iteration", "train_iteration"}``; metrics are what the
      function appends to ``self._metric_list`` (averaged, logged under ``eval/``).
    """

    kind = "evaluator"

    def __init__(self, flow_fn: Callable):
        super().__init__(flow_fn)
        self.prompts: Optional[list] = None
        self.post_process_func: Optional[Callable] = None
        # ChatLearn 1.x: post_process appends metric dicts here; logged as eval/<key>.
        self._metric_prefix = "eval"
        self._metric_list: list[dict] = []
        self._engine = None  # the engine running this evaluator (set by it)

    @property
    def args(self):
        """The ``runtime:`` section (ChatLearn 1.x's ``Evaluator.args``)."""
        from chatlearn.config.globals import get_args

        return get_args().runtime

    def set_dataset(self, prompts: list) -> "Evaluator":
        self.prompts = list(prompts)
        return self

    def set_multiple_datasets(self, all_datasets: list[list]) -> "Evaluator":
        """ChatLearn 1.x: one dataset per list; the evaluator takes them all, in order."""
        _check_datasets(all_datasets)
        self.prompts = [p for dataset in all_datasets for p in dataset]
        return self

    def set_post_process_func(self, fn: Callable) -> "Evaluator":
        self.post_process_func = fn
        return self

    def post_process(self, results: dict, eval_info: dict) -> Any:
        """ChatLearn 1.x's hook (override it): ``results`` by model name; returns what
        ``eval()`` returns. The default returns ``results``."""
        return results

    def get_and_clear_metrics(self) -> tuple[str, dict[str, float]]:
        from chatlearn.models.compat1x import _as_float
        from chatlearn.utils.metrics import mean_metrics

        records = [{k: _as_float(v) for k, v in r.items()} for r in self._metric_list]
        self._metric_list = []
        return self._metric_prefix, mean_metrics(records)

    def eval(self, cur_iter: Optional[int] = None, train_iteration: Optional[int] = None) -> Any:
        """Evaluate now and return the post-processed results (ChatLearn 1.x). Runs on the
        workers of the engine that runs this evaluator: call it from inside ``learn()``,
        or use ``EvalEngine(evaluator=...).eval()`` for an evaluation alone."""
        engine = self._engine
        if engine is None or not engine.running:
            raise RuntimeError("Evaluator.eval() needs the running engine's workers: it runs inside "
                               "engine.learn() (every runtime.eval_episode_interval episodes); to evaluate "
                               "alone, use chatlearn.EvalEngine(evaluator=evaluator).eval()")
        return engine.run_evaluation(-1 if cur_iter is None else cur_iter, train_iteration)[1]

    def process_results(self, samples: list[dict], by_model: dict[str, list], episode: int,
                        train_iteration: int) -> tuple[dict[str, float], Any]:
        """``(metrics, what eval() returns)`` from one evaluation's outputs (see the class doc)."""
        eval_info = {"episode_iteration": episode, "train_iteration": train_iteration}
        fn = self.post_process_func
        metrics: dict[str, float] = {}
        if fn is not None and _takes_eval_info(fn):
            processed = fn(by_model, eval_info)
        elif fn is not None:
            processed = metrics = dict(fn(samples, episode) or {})
        elif type(self).post_process is not Evaluator.post_process:
            processed = self.post_process(by_model, eval_info)
        else:
            processed, metrics = by_model, {"num_samples": float(len(samples))}
        metrics.update(self.get_and_clear_metrics()[1])
        return metrics, processed


def _takes_eval_info(fn: Callable) -> bool:
    """Whether a post-process function has ChatLearn 1.x's ``(results, eval_info)`` signature."""
    try:
        return "eval_info" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_datasets(all_datasets: Any) -> None:
    if not isinstance(all_datasets, list) or not all_datasets or \
            not all(isinstance(d, list) for d in all_datasets):
        raise TypeError("set_multiple_datasets expects a non-empty list of prompt lists")


def _collect(values, found: dict[int, BaseModule]) -> None:
    for value in values:
        if isinstance(value, BaseModule):
            found[id(value)] = value
