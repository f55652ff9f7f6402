"""Training a Megatron module outside the RL engine (SFT, reward-model fitting).

``launch`` starts ``nproc`` ranks (TP x PP x DP) in plain processes;
``fit`` runs epochs of shuffled global batches, each rank taking its
data-parallel share as micro-batches (``split_global_batch``, as in the
engine), and returns the logged metrics.
"""
from __future__ import annotations

import argparse
import random
import sys
from typing import Any, Callable, Optional

from chatlearn.data.batching import split_global_batch
from chatlearn.utils.launch import init_single_process, spawn


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` on ``nproc`` ranks; in this process when ``nproc`` is 1."""
    if nproc == 1:
        init_single_process()
        fn(0, 1, *args)
    else:
        spawn(fn, nproc, *args)


def training_parser(description: str, data_help: str, epochs: int, lr: float) -> argparse.ArgumentParser:
    """The command line the standalone training scripts share (their own options are added after)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--load", required=True, help="Hugging Face checkpoint directory to start from")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--save", required=True, help="output Hugging Face checkpoint directory")
    p.add_argument("--nproc", type=int, default=1, help="ranks: TP x PP x DP")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--drop-last", action="store_true",
                   help="leave each epoch's short last global batch out (every step the same size)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p


def epoch_batches(num_samples: int, global_batch_size: int, seed: int, drop_last: bool) -> list[list[int]]:
    """One epoch's global batches: sample indices in a ``seed``-shuffled order, cut into
    ``global_batch_size`` pieces; the short last piece is kept, or left out with ``drop_last``."""
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    stop = num_samples - num_samples % global_batch_size if drop_last else num_samples
    if stop == 0:
        raise ValueError(f"{num_samples} samples do not make one global batch of {global_batch_size} "
                         "(drop_last): lower --global-batch")
    return [order[start:start + global_batch_size] for start in range(0, stop, global_batch_size)]


def fit(module, samples: list[dict], *, epochs: int, global_batch_size: int, micro_batch_size: int,
        seed: int = 0, log: Optional[Callable[[int, dict], None]] = None, desc: str = "train",
        drop_last: bool = False) -> list[dict]:
    """Train ``module`` (a set-up, trainable MegatronModule) on ``samples`` (dicts of 1-D tensors).

    Each epoch visits the samples in a new seeded order, in global batches of
    ``global_batch_size``, split over the data-parallel ranks by ``split_global_batch``
    like the engine's trainers. The epoch's last global batch is shorter when the size
    does not divide, or, with ``drop_last`` (torch ``DataLoader``'s meaning: every step
    the same size), left out of that epoch; the next epoch's shuffle brings its samples back.
    """
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    epochs_of_batches = [epoch_batches(len(samples), global_batch_size, seed + epoch, drop_last)
                         for epoch in range(epochs)]
    history = []
    show = ps.is_pipeline_last_stage() and dp_rank == 0 and ps.get_tensor_model_parallel_rank() == 0
    bar = tqdm(total=sum(map(len, epochs_of_batches)), desc=desc, disable=not (show and sys.stderr.isatty()))
    step = 0
    for batches in epochs_of_batches:
        for indices in batches:
            batch = [samples[i] for i in indices]
            metrics = module.train_step(split_global_batch(batch, dp, micro_batch_size)[dp_rank], step)
            step += 1
            bar.update(1)
            if metrics is not None:
                history.append(metrics)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "accuracy")})
                if log is not None:
                    log(step, metrics)
    bar.close()
    return history
