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
exist.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from chatlearn.models.base import BaseModule


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
        """Run the flow once on placeholders to record which stage feeds which."""
        models = self.models()
        saved = []
        counter: dict[str, int] = {}
        graph: list[FlowNode] = []

        def recorder(model: BaseModule, method: str):
            def record(*inputs, **kwargs):
                names = tuple(x.node for x in inputs if isinstance(x, _Traced))
                key = f"{model.name}.{method}"
                counter[key] = counter.get(key, 0) + 1
                node = FlowNode(model.name, method, names or ("input",), f"{key}#{counter[key]}")
                graph.append(node)
                return _Traced(node.name)
            return record

        try:
            for model in models:
                for method in type(model).remote_methods():
                    saved.append((model, method, model.__dict__.get(method)))
                    setattr(model, method, recorder(model, method))
            self.flow_fn(_Traced("input"))
        finally:
            for model, method, previous in saved:
                if previous is None:
                    model.__dict__.pop(method, None)
                else:
                    setattr(model, method, previous)
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


class Evaluator(BaseFlow):
    """Runs on the evaluation prompts every ``eval_episode_interval`` episodes.

    ``set_post_process_func(fn)``: ``fn(results: list[dict], episode) -> dict``
    turns the flow's outputs into metrics (logged under ``eval/``).
    """

    kind = "evaluator"

    def __init__(self, flow_fn: Callable):
        super().__init__(flow_fn)
        self.prompts: Optional[list] = None
        self.post_process_func: Optional[Callable] = None

    def set_dataset(self, prompts: list) -> "Evaluator":
        self.prompts = list(prompts)
        return self

    def set_post_process_func(self, fn: Callable[[list, int], dict]) -> "Evaluator":
        self.post_process_func = fn
        return self


def _collect(values, found: dict[int, BaseModule]) -> None:
    for value in values:
        if isinstance(value, BaseModule):
            found[id(value)] = value
