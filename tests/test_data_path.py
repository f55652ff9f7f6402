"""Batches between roles: flow stages hand their outputs from actor to actor, and the
driver fetches only what it reads (chatlearn/runtime/calls.py, ModelWorker.output).

Real Ray and real workers (the toy models of tests/configs/toy_rlhf.yaml). A ``Canary``
in a batch counts how often this process unpickled it, i.e. how often the driver
fetched a batch that holds one.
"""
from __future__ import annotations

import os

import ray
import torch

import chatlearn
from chatlearn.config.globals import get_args
from chatlearn.runtime.calls import CallTracker
from chatlearn.runtime.startup import create_models, start_cluster, stop_cluster, worker_env
from toy_models import ToyReference, ToyReward

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "toy_rlhf.yaml")


def _unpickle_canary() -> "Canary":
    Canary.loads += 1
    return Canary()


class Canary:
    loads = 0  # in this process

    def __reduce__(self):
        return _unpickle_canary, ()


class CanaryReference(ToyReference):
    """The toy reference (two ranks, rank 1 its output rank), its output carrying a Canary."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        return {**super().forward_step(data, iteration), "canary": Canary()}


def test_stage_outputs_go_actor_to_actor_and_only_the_flow_output_reaches_the_driver(ray_session, toy_env):
    chatlearn.init(CONFIG)
    config = get_args()
    cluster = start_cluster(config)
    tracker = CallTracker(120)
    dist: dict = {}
    reference, reward = CanaryReference("reference"), ToyReward("reward")
    try:
        create_models({"reference": reference, "reward": reward}, cluster, config, tracker, worker_env(config, {}),
                      dist)
        batch = {"prompt_id": torch.arange(4), "x": torch.randn(4, 4), "response": torch.randn(4, 4)}
        loads = Canary.loads

        # reference (both ranks) -> reward: the reward's actor gets the reference's batch from Ray,
        # not through the driver, and the driver reads the flow's output once.
        out = reward.forward_step(reference.forward_step(batch))
        final = tracker.get([out.ref])[0]
        assert set(final) >= {"x", "ref_response", "reward", "canary"}
        # Watching every other call (the reference's two ranks) fetches no batch either.
        tracker.wait_all()
        assert Canary.loads - loads == 1

        # Only a replica's output rank returns data; its tensor-parallel peer returns None.
        ranks = dist["reference"].replicas[0]
        assert [w.is_output_rank for w in ranks] == [False, True]
        calls = [w.actor.output.options(num_returns=2).remote("forward", "forward_step", 1, batch) for w in ranks]
        assert ray.get([status for status, _ in calls]) == [None, None]
        data = ray.get([data for _, data in calls])
        assert data[0] is None and "canary" in data[1]
    finally:
        for d in dist.values():
            d.kill()
        stop_cluster(cluster)
