"""Checkpoints of a run: where they live, which one a run resumes from, writing one.

A checkpoint is ``<root>/episode_<N>/``: ``data_state.pt`` (the engine's position:
prompts, relay buffers, rollout processor, iterations, metrics history) and
``models/<name>/`` (each trainer's own save), written under a temporary name, renamed
into place once complete, with a manifest of sizes and checksums written last
(``chatlearn.utils.atomic``). What goes into ``data_state.pt`` is the engine's to say
(``Engine._data_state`` / ``_load_data_state``).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from chatlearn.config.schema import RuntimeConfig
from chatlearn.utils.atomic import (atomic_checkpoint, atomic_torch_save, checkpoint_path, is_complete,
                                    latest_intact_checkpoint, remove_abandoned, set_aside_checkpoints_after,
                                    verify_checkpoint)
from chatlearn.utils.logging import get_logger

logger = get_logger(__name__)

DATA_STATE = "data_state.pt"


def checkpoint_root(runtime: RuntimeConfig) -> str:
    """``runtime.data_checkpoint_path``, else ``<output_dir>/<exp_name>/checkpoints``."""
    return runtime.data_checkpoint_path or os.path.join(runtime.run_dir, "checkpoints")


def find_resume_checkpoint(runtime: RuntimeConfig, root: str) -> Optional[tuple[int, str]]:
    """``(episode, directory)`` to resume from: ``load_data_checkpoint_iteration``'s, else the
    newest intact one (a damaged one is reported, naming the file, and skipped); None: start."""
    if not runtime.enable_resume_training:
        return None
    for path in remove_abandoned(root):
        logger.info("removed %s, a checkpoint an interrupted run did not finish", path)
    wanted = runtime.load_data_checkpoint_iteration
    if wanted is not None:
        path = checkpoint_path(root, wanted - 1)
        problem = verify_checkpoint(path) if is_complete(path) else f"no complete checkpoint at {path}"
        if problem:
            raise FileNotFoundError(f"runtime.load_data_checkpoint_iteration={wanted}: {problem}")
        found = (wanted - 1, path)
    else:
        found = latest_intact_checkpoint(root, report=logger.error)
    # Newer checkpoints (damaged, or of the history an older resume point abandons) would
    # be taken for this run's own by the next resume: move them aside, delete nothing.
    aside = set_aside_checkpoints_after(root, found[0] if found else -1)
    if aside is not None:
        logger.warning("moved the checkpoints after the one this run resumes from to %s", aside)
    return (found[0], str(found[1])) if found else None


def save_checkpoint(root: str, episode: int, keep_last: Optional[int], data_state: dict[str, Any],
                    save_models: Callable[[str], None]) -> None:
    """Write episode ``episode``'s checkpoint: ``data_state``, then ``save_models(dir)`` writes
    each model under ``dir/<name>``; the oldest beyond ``keep_last`` are deleted after."""
    with atomic_checkpoint(root, episode, keep_last=keep_last) as tmp:
        atomic_torch_save(data_state, os.path.join(tmp, DATA_STATE))
        save_models(os.path.join(tmp, "models"))
    logger.info("saved checkpoint of episode %d under %s", episode + 1, root)


def load_data_state(path: str) -> dict[str, Any]:
    return torch.load(os.path.join(path, DATA_STATE), map_location="cpu", weights_only=False)
