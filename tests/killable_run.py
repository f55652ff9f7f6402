"""Run an entry script, killing its driver with SIGKILL at a chosen point of a chosen episode.

    CHATLEARN_TEST_KILL=<episode>:<point> python tests/killable_run.py SCRIPT [ARGS...]

``episode`` is 0-based. Points, in the order an episode passes them:

    environment   before the episode's first rollout is asked for
    rollouts      after its first rollout batch came back, the rest still in flight
    train         training steps queued, their results not collected yet
    sync          training done, weights not yet sent to the inference models
    after_sync    weights sent; evaluation and the checkpoint not done yet
    checkpoint    the checkpoint half-written (its data state on disk, the models not)

A SIGKILL leaves no chance to clean up, as a node failure or the OOM killer would.
Used by tests/test_resume.py; not part of the library.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(episode: int, point: str) -> None:
    from chatlearn.runtime import engine as engine_module

    Engine = engine_module.Engine
    current = {"episode": -1}

    def at(name: str, wrapped, when: str = "before"):
        def wrapper(self, *args, **kwargs):
            if when == "before" and current["episode"] == episode and point == name:
                _die()
            result = wrapped(self, *args, **kwargs)
            if when == "after" and current["episode"] == episode and point == name:
                _die()
            return result
        return wrapper

    run_episode = Engine._run_episode

    def tracking(self, ep):
        current["episode"] = ep
        return run_episode(self, ep)

    Engine._run_episode = tracking
    Engine._episode_prompts = at("environment", Engine._episode_prompts)
    Engine._collect_train_metrics = at("train", Engine._collect_train_metrics)
    sync = Engine._sync_parameters
    Engine._sync_parameters = at("after_sync", at("sync", sync), when="after")

    # The environment's batches are read by Engine._collect (through _collect_flow); the
    # evaluator's go through _collect_flow too, so only batches read inside _collect count.
    collect, collect_flow = Engine._collect, Engine._collect_flow
    in_collect = {"depth": 0}

    def collecting(self, *args, **kwargs):
        in_collect["depth"] += 1
        try:
            return collect(self, *args, **kwargs)
        finally:
            in_collect["depth"] -= 1

    def first_batch_then_die(self, outputs):
        for i, batch in enumerate(collect_flow(self, outputs)):
            yield batch
            if i == 0 and in_collect["depth"] and current["episode"] == episode and point == "rollouts":
                _die()

    Engine._collect = collecting
    Engine._collect_flow = first_batch_then_die
    from chatlearn.runtime import checkpoint as checkpoint_module

    save = checkpoint_module.atomic_torch_save

    def half_then_die(obj, path):
        save(obj, path)
        if point == "checkpoint" and current["episode"] == episode and str(path).endswith("data_state.pt"):
            _die()

    checkpoint_module.atomic_torch_save = half_then_die


def main() -> None:
    kill = os.environ.get("CHATLEARN_TEST_KILL")
    if kill:
        episode, point = kill.split(":")
        install(int(episode), point)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # what `python SCRIPT` does; runpy does not
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
