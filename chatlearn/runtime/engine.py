"""Engines: the single controller that runs episodes.

``Engine.learn()`` reads like the algorithm:

    for episode:
        samples  = environment flow over this episode's prompts   (streamed over replicas)
        samples  = rollout processor (in the driver: advantages, pairs, filters)
        samples  = relay buffers' choice of training samples
        for epoch, global batch: trainer flow                     (data parallel)
        parameter sync: each trainer -> its inference model
        evaluate, log metrics, checkpoint

With ``runtime.policy_lag`` k > 0 (fixed-lag asynchronous training) episode t
trains on the rollouts of episode t-k's generation, sampled by policy version
max(t-k, 0): the environment flow runs k episodes ahead, and its generation of
episode t+k overlaps episode t's training (``_run_lagged_environment``). With
``policy_lag_mode: streaming`` the unit is the generation batch instead, and an
episode trains on the oldest finished ones, none more than k versions old
(``chatlearn/runtime/streaming.py``).

Start-up order matters and lives in ``_setup``: config checks first (nothing
started yet), then Ray and placement, then workers, then resume.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import json
import logging
import os
import resource
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Protocol

import torch

from chatlearn.config.globals import get_args
from chatlearn.data.batching import collate, derive_seed, split_batch, split_global_batch
from chatlearn.data.prompts import (PromptDataset, filter_min_prompt_length, limit_prompts, rank_by_length,
                                    with_prompt_field)
from chatlearn.data.relay import RelayBuffers
from chatlearn.data.stream_dataset import StreamDataset
from chatlearn.models.base import BaseModule
from chatlearn.models.compat1x import RESUME_ENV, STORE_ENV
from chatlearn.runtime import checkpoint
from chatlearn.runtime.calls import CallTracker
from chatlearn.runtime.console import Progress, episode_summary, full_summary
from chatlearn.runtime.dist_model import DistModel, RemoteBatch
from chatlearn.runtime.flow import BaseFlow, Environment, Evaluator, FlowError, Trainer, _check_datasets
from chatlearn.runtime.streaming import StreamingRollouts
from chatlearn.runtime.startup import Cluster, create_models, start_cluster, stop_cluster, worker_env
from chatlearn.synchronizer.base import ParameterSynchronizer, StateDictSynchronizer
from chatlearn.data.rollout_dump import rollout_record
from chatlearn.utils.atomic import atomic_write_bytes
from chatlearn.utils.dependency_logs import quiet_dependencies
from chatlearn.utils.logging import get_logger
from chatlearn.utils.metrics import MetricsWriter, mean_metrics, merge_model_metrics

logger = get_logger(__name__)

# Request seeds are 63-bit (vLLM seeds a torch generator with them).
_SEED_MASK = (1 << 63) - 1


__all__ = ["Engine", "EvalEngine", "FlowError", "TrainBatch", "RolloutProcessor"]


class LaunchedFlow(NamedTuple):
    """An environment flow submitted over one episode's prompts, not yet collected."""
    episode: int  # the episode whose prompts (and request seeds) it samples
    version: int  # the policy version sampling it (weight syncs so far)
    outputs: collections.deque


class Rollouts(NamedTuple):
    """One episode's collected rollouts, as the trainers will get them."""
    episode: int  # the episode whose prompts they answer
    version: int  # the policy version that sampled them
    samples: list[dict]  # after the rollout processor: the training samples
    metrics: dict[str, float]  # the rollout metrics (samples/environment, reward/mean, ...)
    raw: list[dict]  # the environment's output samples, for rollout_dump_dir (else empty)
    versions: tuple = ()  # policy_lag_mode streaming: each raw sample's policy version


class TrainBatch:
    """One global training batch; each trainer splits it for its own data-parallel size."""

    def __init__(self, samples: list[dict], micro_batch_size: int, pad_values: Optional[dict] = None):
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.pad_values = pad_values  # per key (the models' add_padding_config); default 0

    def per_dp_rank(self, dp_size: int) -> list[list[dict]]:
        """``split_global_batch``: equal micro-batch counts and shapes on every rank, the
        short tail padded with rows that weigh nothing (never dropped)."""
        return split_global_batch(self.samples, dp_size, self.micro_batch_size, self.pad_values)


class RolloutProcessor(Protocol):
    """Driver-side step between the environment and the trainer (see chatlearn/algorithms).

    ``process`` turns one environment-flow output batch into training data
    (e.g. KL-shaped rewards and GAE advantages) and returns metrics about it; it
    may add per-rollout keys (advantages) to the batch it is given, which the
    rollout dump records. ``is_trainable(sample)`` says whether a training sample
    can teach anything (a global batch with none is skipped, not trained on).
    ``end_episode`` sees the episode's averaged metrics (e.g. to adapt a KL
    coefficient) and may add some. Its state is saved in checkpoints.
    """

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]: ...

    def is_trainable(self, sample: dict) -> bool: ...

    def end_episode(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Engine:
    """Runs an environment flow, a trainer flow and an optional evaluator.

    ``name`` (ChatLearn 1.x's fourth argument, also accepted there) labels the run in logs.
    """

    def __init__(self, environment: Optional[Environment] = None, trainer: Optional[Trainer] = None,
                 evaluator: Optional[Evaluator] = None, rollout_processor: Optional[RolloutProcessor] = None,
                 name: Optional[str] = None):
        if isinstance(rollout_processor, str):  # ChatLearn 1.x: Engine(env, trainer, evaluator, name)
            name, rollout_processor = rollout_processor, None
        self.config = get_args()
        self.runtime = self.config.runtime
        self.name = name or type(self).__name__
        self.environment = environment
        self.trainer = trainer
        self.evaluator = evaluator
        self.rollout_processor = rollout_processor
        self._register_flows()
        self.sync_pairs: list[tuple[str, str, ParameterSynchronizer]] = []
        self.relay_sample_fn: Optional[Callable] = None
        self.prompts: Optional[list] = None
        self.dist: dict[str, DistModel] = {}
        self.tracker = CallTracker(self.runtime.actor_timeout_s)
        self._cluster: Optional[Cluster] = None  # Ray and the placement group, once started
        self._metrics: Optional[MetricsWriter] = None
        self.history: list[dict[str, float]] = []
        self._progress: Optional[Progress] = None
        self.initial_eval: dict[str, float] = {}  # evaluation before the first episode
        self.start_episode = 0
        # Seconds of each start-up part (``startup/<part>_s`` in the first episode's metrics).
        self.startup_times: dict[str, float] = {}
        self._resume_from: Optional[tuple[int, str]] = None  # (episode, checkpoint dir)
        self._steps_this_episode = 0
        self._skipped_this_episode = 0
        # Training steps (trainer-flow calls) so far: ChatLearn 1.x's trainer iteration, passed to
        # save_checkpoint(iteration) and to an evaluator's eval_info; saved in checkpoints.
        self.train_iteration = 0
        # Syncs each inference model has received: the policy version of what it samples.
        self.weight_versions: dict[str, int] = {}
        self.running = False  # between start-up and shutdown (workers exist)
        self.pad_values: dict[str, Any] = {}  # the models' add_padding_config, for training batches
        self._noop_sync: set[tuple[str, str]] = set()  # pairs with a side that holds no weights
        self._collate_fns: dict[str, Optional[Callable]] = {}  # a build_dataset Dataset's collate_fn
        self._store_name = f"chatlearn_store_{uuid.uuid4().hex[:12]}"  # put()/get() of the models
        self._warned_1x_save: set[str] = set()
        # policy_lag > 0: generated episodes not trained on yet, oldest first (saved in checkpoints).
        self._in_flight: collections.deque[Rollouts] = collections.deque()
        self._streaming = StreamingRollouts(self) if self.runtime.policy_lag_mode == "streaming" else None

    # -- user API ----------------------------------------------------------------
    def set_dataset(self, prompts: list) -> "Engine":
        if len(prompts) == 0:
            raise ValueError("set_dataset: the prompt list is empty")
        self.prompts = list(prompts)
        return self

    def set_multiple_datasets(self, all_datasets: list[list]) -> "Engine":
        """ChatLearn 1.x: prompt datasets drawn from in ``runtime.data_ratio``. One dataset is
        ``set_dataset``; mixing several is not implemented."""
        _check_datasets(all_datasets)
        if len(all_datasets) > 1:
            raise NotImplementedError(
                f"set_multiple_datasets: mixing {len(all_datasets)} datasets (ChatLearn 1.x's data_ratio) is not "
                f"implemented; join them into one list for engine.set_dataset(...) (sampled in proportion to "
                f"their sizes), or repeat a dataset's prompts to weigh it more")
        return self.set_dataset(all_datasets[0])

    def set_relay_sample_fn(self, fn: Callable[[list], list[dict]]) -> "Engine":
        """``fn(episode_relay_buffers) -> samples`` picks the training samples of each
        episode from the kept ``EpisodeRelayBuffer``s (oldest first)."""
        self.relay_sample_fn = fn
        return self

    def set_relay_sample_manager(self, manager: Callable[[list], list[dict]]) -> "Engine":
        """ChatLearn 1.0.3's name for ``set_relay_sample_fn`` (a ``RelaySampleManager`` is a callable)."""
        return self.set_relay_sample_fn(manager)

    def set_environment(self, environment: Environment) -> "Engine":
        self.environment = environment
        self._register_flows()
        return self

    def set_trainer(self, trainer: Trainer) -> "Engine":
        self.trainer = trainer
        self._register_flows()
        return self

    def set_evaluator(self, evaluator: Optional[Evaluator]) -> "Engine":
        self.evaluator = evaluator
        self._register_flows()
        return self

    def logging_summary(self, iteration: int = -1) -> dict[str, dict[str, float]]:
        """ChatLearn 1.x: the time summary of episode ``iteration`` (0-based; -1: before training),
        logged and returned as ``{model: {method: seconds}}`` plus ``{"episode": {...}}`` (the
        episode's ``time/*`` metrics). Every episode is also logged by ``learn()`` itself."""
        metrics = self.initial_eval if iteration < 0 else \
            (self.history[iteration - self.start_episode] if 0 <= iteration - self.start_episode < len(self.history)
             else {})
        summary: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            if not key.startswith("time/"):
                continue
            name, _, method = key[len("time/"):].partition(".")
            summary.setdefault(name if method else "episode", {})[method or name] = value
        logger.info("%s episode %d time summary: %s", self.name, iteration + 1,
                    "; ".join(f"{m}: " + ", ".join(f"{k}={v:.3g}s" for k, v in t.items()) for m, t in summary.items())
                    or "nothing recorded")
        return summary

    def set_parameter_sync(self, trainer: BaseModule, inference: BaseModule,
                           synchronizer: Optional[ParameterSynchronizer] = None) -> "Engine":
        """After training, send ``trainer``'s weights to ``inference`` (every sync_frequency episodes)."""
        for model in (trainer, inference):
            if model.name not in self.models:
                raise FlowError(f"set_parameter_sync: model {model.name!r} is not used by any flow of this engine")
        # Setting a pair again replaces its synchronizer (the presets register the default one).
        self.sync_pairs = [p for p in self.sync_pairs if (p[0], p[1]) != (trainer.name, inference.name)]
        self.sync_pairs.append((trainer.name, inference.name, synchronizer or StateDictSynchronizer()))
        return self

    def logging_memory(self) -> dict[str, list[float]]:
        """ChatLearn 1.x: every rank's peak memory in GiB (``peak_memory()``), per model, logged.
        Needs the workers: call it inside ``learn()`` (e.g. from a relay_sample_fn)."""
        if not self.running:
            raise RuntimeError("logging_memory() reads the workers' peak memory: call it while the engine runs; "
                               "after learn() see chatlearn.utils.memory.PeakRSSMonitor")
        peaks = {name: [float(v) for v in self.tracker.get(d.all_ranks("peak_memory"))]
                 for name, d in self.dist.items()}
        for name, values in peaks.items():
            logger.info("%s peak memory (GiB) per rank: %s", name, " | ".join(f"{v:.2f}" for v in values))
        return peaks

    def learn(self) -> list[dict[str, float]]:
        """Run ``runtime.num_episode`` episodes; returns the per-episode metrics."""
        if self.environment is None or self.trainer is None:
            raise ValueError(f"{self.name}.learn() needs an environment and a trainer flow "
                             f"(set_environment / set_trainer); to evaluate alone use EvalEngine")
        if self.prompts is None:
            raise ValueError("call engine.set_dataset(prompts) before engine.learn()")
        try:
            self._setup()
            self._run_episodes()
        finally:
            self.shutdown()
        return self.history

    # -- start-up ----------------------------------------------------------------
    def _register_flows(self) -> None:
        """(Re)collect the models of the engine's flows and trace each flow; all checks
        that need no worker happen here."""
        self.flows: list[BaseFlow] = [f for f in (self.environment, self.trainer, self.evaluator) if f is not None]
        self.models: dict[str, BaseModule] = {}
        for flow in self.flows:
            self._register_flow_models(flow)
        for name, model in self.models.items():
            if self.config.models[name].gpu_per_process > 1:
                raise ValueError(f"{self.config.config_path or 'config'}: models.{name}.gpu_per_process: the engine "
                                 f"runs one process per device (got {self.config.models[name].gpu_per_process}); "
                                 f"a vLLM replica spans tensor_model_parallel_size devices by itself")
            model.check_chatlearn1x_overrides()
        if self.evaluator is not None:
            self.evaluator._engine = self

    def _register_flow_models(self, flow: BaseFlow) -> None:
        models = flow.models()
        if not models:
            raise FlowError(f"{flow.kind} flow {flow.fn_name}() calls no chatlearn model")
        for model in models:
            other = self.models.get(model.name)
            if other is not None and other is not model:
                raise FlowError(f"two different models are named {model.name!r}: {other!r} and {model!r}")
            if model.name not in self.config.models:
                known = ", ".join(sorted(self.config.models)) or "none"
                raise FlowError(
                    f"{flow.kind} flow {flow.fn_name}() uses model {model.name!r}, which is not declared under "
                    f"models: in {self.config.config_path or 'the config'} (declared: {known})"
                )
            self.models[model.name] = model
        flow.trace()

    def _check_relay(self) -> None:
        if self.relay_sample_fn is not None and self.runtime.max_relay_episode == 0:
            logger.warning("a relay_sample_fn is set but runtime.max_relay_episode is 0 (relay off): it is not "
                           "called; set max_relay_episode to -1 (all episodes) or N (the last N) to use it")

    def _check_streaming(self) -> None:
        if self._streaming is None or self.runtime.stream_data_loader_type != "fixed":
            return
        size = self._generation_batch_size(self.environment)
        if self.runtime.sample_per_episode % size:
            raise ValueError(f"runtime.policy_lag_mode 'streaming' hands whole generation batches to episodes: with "
                             f"stream_data_loader_type 'fixed', runtime.sample_per_episode "
                             f"({self.runtime.sample_per_episode}) must be a multiple of the generation batch size "
                             f"({size}: models.{self.environment.graph[0].model}.generation_batch_size or "
                             f"runtime.generation_batch_size)")

    def _setup(self) -> None:
        # Ordering: placement needs Ray; workers need the placement group; setup()
        # needs torch.distributed; resume needs set-up workers; the first sync
        # needs both sides of each pair loaded.
        began = time.perf_counter()
        self._configure_logging()
        self._check_relay()
        self._check_streaming()
        self._check_resume_settings()
        self._locate_checkpoint()  # before the workers start: their setup() sees resume_training
        self._start_models()
        self._setup_data()
        self._setup_output()
        self._maybe_resume()
        self.startup_times["total"] = time.perf_counter() - began
        logger.info("start-up took %.1f s: %s", self.startup_times["total"],
                    ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_times.items() if k != "total"))

    def _configure_logging(self) -> None:
        """runtime.debug: DEBUG logging and every dependency message; else their noise filtered."""
        if self.runtime.debug:
            logging.getLogger("chatlearn").setLevel("DEBUG")
        quiet_dependencies(verbose=self.runtime.debug)

    def _start_models(self) -> None:
        began = time.perf_counter()
        self._cluster = start_cluster(self.config)
        self.placement = self._cluster.placement
        self.startup_times["ray"] = time.perf_counter() - began
        env = worker_env(self.config, {STORE_ENV: self._store_name,
                                       RESUME_ENV: "1" if self._resume_from is not None else "0"})
        create_models(self.models, self._cluster, self.config, self.tracker, env, self.dist, self.startup_times)
        self.running = True
        self._check_weightless_sync_pairs()
        for d in self.dist.values():
            self.pad_values.update({k: v["padding_value"] for k, v in d.padding_config.items()})

    def _check_weightless_sync_pairs(self) -> None:
        """A pair with a side that holds no weights syncs as a no-op, with one warning (as in 1.x)."""
        for src, dst, _ in self.sync_pairs:
            empty = [name for name in (src, dst) if not self.dist[name].has_weights]
            if empty:
                self._noop_sync.add((src, dst))
                logger.warning("parameter sync %s -> %s: %s hold%s no weights (e.g. a module without self.model); "
                               "the pair is synced as a no-op", src, dst, " and ".join(empty),
                               "" if len(empty) > 1 else "s")

    def _build_dataset(self, flow: BaseFlow, prompts: list, is_eval: bool) -> list:
        """The flow's first model's ``build_dataset(prompts, is_eval)`` as samples; a Dataset's
        ``collate_fn`` (ChatLearn 1.x) is kept to batch them."""
        first = self.dist[flow.graph[0].model]
        refs = first.hook("build_dataset", prompts=prompts, is_eval=is_eval)
        dataset = next(r for r, w in zip(self.tracker.get(refs), first.workers) if w.is_output_rank)
        if dataset is None:
            raise ValueError(f"{type(first.module).__name__}.build_dataset() returned None: it must return the "
                             f"samples (a list or a torch Dataset)")
        collate_fn = getattr(dataset, "collate_fn", None)
        self._collate_fns[flow.kind] = collate_fn
        return _as_samples(dataset, dicts=collate_fn is None)

    def _setup_data(self) -> None:
        if self.environment is not None:
            self._setup_train_data()
        self.eval_samples: list = []
        if self.evaluator is not None and self.evaluator.prompts is not None:
            prompts = with_prompt_field(limit_prompts(self.evaluator.prompts, self.runtime.eval_data_num_limit),
                                        self.runtime.query_key)
            self.eval_samples = self._build_dataset(self.evaluator, prompts, True)

    def _setup_train_data(self) -> None:
        first = self.dist[self.environment.graph[0].model]
        prompts = with_prompt_field(limit_prompts(self.prompts, self.runtime.training_data_num_limit),
                                    self.runtime.query_key)
        samples = self._build_dataset(self.environment, prompts, False)
        min_length = self.config.models[first.name].batch_generation.min_prompt_length
        if min_length > 0:
            kept = filter_min_prompt_length(samples, min_length)
            logger.info("batch_generation.min_prompt_length=%d keeps %d of %d prompts", min_length, len(kept),
                        len(samples))
            if not kept:
                raise ValueError(f"models.{first.name}.batch_generation.min_prompt_length={min_length} "
                                 f"drops every prompt")
            samples = kept
        self.prompt_data = PromptDataset(samples, seed=self.runtime.seed, shuffle=self.runtime.data_shuffle)
        self.relay = RelayBuffers(self.runtime.max_relay_episode, self.runtime.relay_episode_offset,
                                  seed=self.runtime.seed)

    def _locate_checkpoint(self) -> None:
        """Pick the checkpoint to resume from (before anything is logged: an interrupted
        attempt's metrics after it are cut away)."""
        self.run_dir = self.runtime.run_dir
        self.checkpoint_root = checkpoint.checkpoint_root(self.runtime)
        self._resume_from = checkpoint.find_resume_checkpoint(self.runtime, self.checkpoint_root)

    def _setup_output(self) -> None:
        """Open the metrics (cut back to the checkpoint a resumed run starts from)."""
        start = self._resume_from[0] + 1 if self._resume_from else 0
        self._metrics = MetricsWriter(self.run_dir, start_episode=start)

    # -- the episode loop --------------------------------------------------------
    def _run_episodes(self) -> None:
        episodes = range(self.start_episode, self.runtime.num_episode)
        if not episodes:
            logger.info("all %d episodes are already done (checkpoints in %s): nothing to run; raise "
                        "runtime.num_episode to continue, or use a new output_dir", self.runtime.num_episode,
                        self.checkpoint_root)
        if self.start_episode == 0 and self._evaluates() and self.runtime.enable_eval_before_training:
            # A baseline, so the first logged evaluation after training has something to beat.
            self.initial_eval = self.evaluate(-1)
            self._metrics.write(-1, self.initial_eval)
            logger.info("before training: %s", episode_summary(self.initial_eval))
        self._progress = Progress(self.start_episode, self.runtime.num_episode, logger,
                                  interval_s=self.runtime.progress_interval_s, verbose=self.runtime.debug)
        try:
            for episode in episodes:
                metrics = self._run_episode(episode)
                if episode == self.start_episode:
                    metrics.update({f"startup/{part}_s": s for part, s in self.startup_times.items()})
                self.history.append(metrics)
                self._metrics.write(episode, metrics)
                self._progress.episode_done(episode, metrics)
                if self.runtime.save_episode_interval and (episode + 1) % self.runtime.save_episode_interval == 0:
                    self._progress.phase("checkpoint", episode)
                    self.save_checkpoint(episode)
        finally:
            self._progress.close()

    def _run_episode(self, episode: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        began, waited = time.perf_counter(), self.tracker.wait_s
        # "time/train" also tells the progress heartbeat that the episode is in "train".
        timer = functools.partial(_timed, metrics,
                                  on_start=lambda key: self._progress.phase(key[len("time/"):], episode))
        for d in self.dist.values():
            d.reset_round_robin()
        self._hook_all("before_episode", episode=episode)
        stream = self._stream(episode)
        # Training starts while rollouts still arrive, unless the relay buffers
        # must see the whole episode first or colocated models take turns.
        streaming = not self.relay.relay_active(episode) and not self._uses_free_memory()

        generating: list[LaunchedFlow] = []  # policy_lag > 0: the generations that overlap training
        if self.runtime.policy_lag == 0:
            with timer("time/environment"):
                self._phase(active=self._flow_models(self.environment))
                rollouts = self._collect(self._launch_environment(episode), stream if streaming else None)
        elif self._streaming is not None:
            streaming = False
            with timer("time/environment"):
                self._phase(active=self._flow_models(self.environment))
                rollouts, lag_metrics = self._streaming.take(episode)
            metrics.update(lag_metrics)
        else:
            streaming = False
            rollouts, generating = self._run_lagged_environment(episode, timer)
            metrics.update(self._lag_metrics(rollouts, generating))
        samples = rollouts.samples
        metrics.update(rollouts.metrics)
        if self.runtime.rollout_dump_dir:
            self._dump_rollouts(episode, rollouts)
        if self.runtime.stream_data_loader_type == "fixed" and len(samples) != self.runtime.sample_per_episode:
            raise ValueError(f"environment flow {self.environment.fn_name}() produced {len(samples)} samples; "
                             f"runtime.stream_data_loader_type 'fixed' needs exactly "
                             f"runtime.sample_per_episode={self.runtime.sample_per_episode} (use 'dynamic')")
        self.relay.add(episode, samples)
        if not streaming:
            fixed = stream.mode == "fixed"
            chosen = self.relay.select(episode, self.relay_sample_fn,
                                       num_samples=self.runtime.sample_per_episode if fixed else None)
            if self.relay.relay_active(episode):
                # The relay's (or the user's relay_sample_fn's) choice from other episodes: older rollouts,
                # sampled by older policies, trained on by explicit choice, not by the lag.
                own = {id(s) for s in samples}
                metrics["relay/samples_from_other_episodes"] = float(sum(id(s) not in own for s in chosen))
            stream.extend(chosen)
        stream.finish()
        metrics["samples/train"] = stream.num_samples

        with timer("time/train"):
            self._phase(active=self._flow_models(self.trainer))
            self._train_steps(stream.iter_train_batches())
            self._in_flight.extend(self._collect(flow, None) for flow in generating)
            metrics.update(self._collect_train_metrics())
        if not metrics["train/steps"]:
            logger.warning("episode %d: no trainable samples (%d samples, %d global batches without one; e.g. "
                           "every online-DPO pair tied, or every GRPO group scored alike): training skipped",
                           episode + 1, stream.num_samples, int(metrics["train/skipped_batches"]))

        with timer("time/sync"):
            self._sync_parameters(episode, metrics)

        self._hook_all("after_episode", episode=episode)
        if self._evaluates() and (episode + 1) % self.runtime.eval_episode_interval == 0:
            with timer("time/eval"):
                metrics.update(self.evaluate(episode))
        for name, d in self.dist.items():
            timings, module_metrics = d.pop_episode_stats()
            metrics.update(module_metrics)  # ChatLearn 1.x's _metric_list, as <prefix>/<key>
            remote = d.module.remote_modes()
            metrics.update({f"time/{name}.{method}": seconds for method, seconds in timings.items()
                            if method in remote})
        # The driver's own share: the episode's time less the time it sat waiting for workers.
        metrics["time/episode"] = time.perf_counter() - began
        metrics["time/driver"] = metrics["time/episode"] - (self.tracker.wait_s - waited)
        metrics["driver/peak_rss_gib"] = _peak_rss_gib()
        if self.runtime.policy_lag:
            metrics.update(self._idle_fractions(metrics))
        return metrics

    def _idle_fractions(self, metrics: dict[str, float]) -> dict[str, float]:
        """The share of the episode the generator (the environment's first model) and the
        trainers sat idle: 1 - their busy seconds per replica / the episode's seconds."""
        def idle(models: Iterable[str], method: str) -> float:
            busy = max((metrics.get(f"time/{m}.{method}", 0.0) / self.dist[m].num_replicas for m in models),
                       default=0.0)
            return max(0.0, 1.0 - busy / metrics["time/episode"])

        return {"async/generator_idle_fraction": idle([self.environment.graph[0].model], "forward_step"),
                "async/trainer_idle_fraction": idle(self._flow_models(self.trainer), "train_step")}

    def _launch_environment(self, episode: int) -> "LaunchedFlow":
        """Start the environment flow over ``episode``'s prompts with the policy's current weights."""
        policy = self.environment.graph[0].model
        return LaunchedFlow(episode, self.weight_versions.get(policy, 0),
                            self._launch_flow(self.environment, self._episode_prompts(episode), episode))

    def _collect(self, launched: "LaunchedFlow", stream: Optional[StreamDataset]) -> "Rollouts":
        """Wait for ``launched``'s batches in order; the rollout processor turns each into
        training samples. With ``stream``, global batches start training as they fill."""
        samples, rollout_metrics, rollout_sizes, raw = [], [], [], []
        for batch, _ in self._collect_flow(launched.outputs):
            train_batch, batch_metrics, rows, batch_raw = self._process_batch(batch, launched.episode)
            rollout_metrics.append(batch_metrics)
            rollout_sizes.append(rows)
            raw += batch_raw
            samples += train_batch
            if stream is not None:
                stream.extend(train_batch)
                self._train_steps(stream.ready_batches())
        metrics = self._rollout_metrics(len(samples), rollout_metrics, rollout_sizes)
        return Rollouts(launched.episode, launched.version, samples, metrics, raw)

    def _process_batch(self, batch: dict, episode: int) -> tuple[list[dict], Optional[dict], int, list[dict]]:
        """One environment output batch -> its training samples (the rollout processor's), the
        processor's metrics, the batch's rows, and its samples as generated (for the dump)."""
        train_batch, batch_metrics = batch, None
        if self.rollout_processor is not None:
            train_batch, batch_metrics = self.rollout_processor.process(batch, episode)
        raw = split_batch(batch) if self.runtime.rollout_dump_dir else []
        return split_batch(train_batch), batch_metrics, _batch_size(batch), raw

    def _rollout_metrics(self, num_samples: int, batch_metrics: list, rows: list[int]) -> dict[str, float]:
        """An episode's rollout metrics from its batches' (the rollout processor closes the episode)."""
        metrics: dict[str, float] = {"samples/environment": num_samples}
        if self.rollout_processor is not None:
            metrics.update(mean_metrics(batch_metrics, rows))
            metrics.update(self.rollout_processor.end_episode(dict(metrics)))
        return metrics

    def _run_lagged_environment(self, episode: int, timer: Callable) -> tuple["Rollouts", list["LaunchedFlow"]]:
        """``policy_lag`` k > 0: the rollouts episode ``episode`` trains on (generated k episodes
        ago, or, in the first k episodes, by the initial policy), and the generations launched
        to keep k episodes ahead. Those sample with the current weights; the episode's training
        is queued right after them and they are collected inside ``time/train``, so the two
        overlap unless colocated roles with ``free_memory`` must take turns (then generation
        runs first and nothing is left running)."""
        lag = self.runtime.policy_lag
        with timer("time/environment"):
            self._phase(active=self._flow_models(self.environment))
            launched = []
            while len(self._in_flight) + len(launched) <= lag:
                generation = episode + len(self._in_flight) + len(launched)
                if generation >= self.runtime.num_episode and (self._in_flight or launched):
                    break  # nothing left to train on it
                launched.append(self._launch_environment(generation))
            if not self._in_flight:  # the first episode: it trains on its own rollouts
                self._in_flight.append(self._collect(launched.pop(0), None))
            current = self._in_flight.popleft()
            if self._uses_free_memory():  # colocated roles take turns: generate now, train after
                self._in_flight.extend(self._collect(flow, None) for flow in launched)
                launched = []
        return current, launched

    def _lag_metrics(self, rollouts: "Rollouts", generating: list["LaunchedFlow"]) -> dict[str, float]:
        """How stale this episode's training samples are: policy versions between the one that
        sampled them and the one they train (all samples of a fixed-lag episode share it)."""
        policy = self.environment.graph[0].model
        lag = self.weight_versions.get(policy, 0) - rollouts.version
        return {"async/policy_lag": float(lag), "async/generated_episode": float(rollouts.episode),
                "async/in_flight_episodes": float(len(self._in_flight) + len(generating))}

    def _episode_prompts(self, episode: int) -> list[dict]:
        prompts = self.prompt_data.next_episode(self.runtime.sample_per_episode)
        if self.config.models[self.environment.graph[0].model].batch_generation.ranking:
            prompts = rank_by_length(prompts)
        return prompts

    def _run_flow(self, flow: BaseFlow, samples: list, episode: int) -> Iterator[tuple[dict, list]]:
        """Push every batch of ``samples`` through ``flow`` at once (stages of different
        batches overlap on different replicas), then yield each output batch in order
        as it completes, with ``[(model name, that stage's output)]`` for each stage the
        flow returned (a flow returning several merges them into the batch, later wins)."""
        yield from self._collect_flow(self._launch_flow(flow, samples, episode))

    def _generation_batch_size(self, flow: BaseFlow) -> int:
        first = self.config.models[flow.graph[0].model]
        return first.generation_batch_size if first.generation_batch_size > 0 else self.runtime.generation_batch_size

    def _launch_flow(self, flow: BaseFlow, samples: list, episode: int, first_index: int = 0) -> collections.deque:
        """Submit ``flow`` over every batch of ``samples``; the returned queue holds each batch's
        output refs for ``_collect_flow``.

        Each sample gets a ``request_seed`` from (runtime.seed, flow, episode, its index in the
        episode's prompts; ``samples`` start at ``first_index``):
        a sampler that seeds each request with it (vLLM's ``request_seeds``) draws the
        same responses whether or not the run was interrupted and resumed.
        """
        kind = 1 if flow is self.evaluator else 0
        seeds = [derive_seed(self.runtime.seed, kind, episode, first_index + i) & _SEED_MASK
                 for i in range(len(samples))]
        collate_fn = self._collate_fns.get(flow.kind)
        batch_size = self._generation_batch_size(flow)
        outputs: collections.deque = collections.deque()
        for start in range(0, len(samples), batch_size):
            chunk, chunk_seeds = samples[start:start + batch_size], seeds[start:start + batch_size]
            if collate_fn is None:
                batch = collate([{**s, "request_seed": seed} for s, seed in zip(chunk, chunk_seeds)])
            else:  # the Dataset's own collate_fn (ChatLearn 1.x)
                batch = collate_fn(chunk)
                if isinstance(batch, dict) and "request_seed" not in batch:
                    batch = {**batch, "request_seed": chunk_seeds}
            out = flow(batch)
            parts = out if isinstance(out, (tuple, list)) else (out,)
            if not parts or not all(isinstance(o, RemoteBatch) for o in parts):
                raise FlowError(f"{flow.kind} flow {flow.fn_name}() must return the output of a model call "
                                f"(or several, as a tuple)")
            outputs.append(parts)
        return outputs

    def _collect_flow(self, outputs: collections.deque) -> Iterator[tuple[dict, list]]:
        while outputs:
            # Fetched here, once: only the flow's outputs come to the driver (earlier stages'
            # batches go from actor to actor). Popped, so Ray frees each batch once it is read.
            parts = outputs.popleft()
            batches = self.tracker.get([o.ref for o in parts])
            merged: dict = {}
            for b in batches:
                merged.update(b)
            yield merged, [(o.producer.split(".")[0], b) for o, b in zip(parts, batches)]

    def _stream(self, episode: int) -> StreamDataset:
        # A custom relay_sample_fn decides how many samples to train on, so its
        # episodes are batched like dynamic ones.
        mode = self.runtime.stream_data_loader_type
        if self.relay_sample_fn is not None and self.relay.relay_active(episode):
            mode = "dynamic"
        # The stream hands out whole global batches; each trainer's DistModel splits them
        # for its own data-parallel size (TrainBatch).
        stream = StreamDataset(
            mode=mode,
            sample_per_episode=self.runtime.sample_per_episode,
            train_global_batch_size=self.runtime.train_global_batch_size,
            num_training_epoch=self.runtime.num_training_epoch,
            seed=self.runtime.seed,
        )
        stream.start_episode(episode)
        return stream

    def _train_steps(self, steps: Iterable) -> None:
        """Queue one trainer-flow call per global batch (not waited on here); a global batch
        in which no sample can teach anything (``RolloutProcessor.is_trainable``) is skipped."""
        for _epoch, _step, samples in steps:
            if self.rollout_processor is not None and not any(map(self.rollout_processor.is_trainable, samples)):
                self._skipped_this_episode += 1
                continue
            self.trainer(TrainBatch(samples, self.runtime.train_micro_batch_size, self.pad_values))
            self._steps_this_episode += 1
            self.train_iteration += 1

    def _dump_rollouts(self, episode: int, rollouts: "Rollouts") -> None:
        """``<rollout_dump_dir>/episode_<N>.jsonl``: one line per rollout episode ``episode`` trains
        on, with the policy version that sampled it (see docs/data.md)."""
        versions = rollouts.versions or [rollouts.version] * len(rollouts.raw)
        lines = [json.dumps(rollout_record(r, i, episode, v)) + "\n"
                 for i, (r, v) in enumerate(zip(rollouts.raw, versions))]
        path = os.path.join(self.runtime.rollout_dump_dir, f"episode_{episode:06d}.jsonl")
        atomic_write_bytes(path, "".join(lines).encode())

    def _collect_train_metrics(self) -> dict[str, float]:
        per_model = {name: mean_metrics([r for r in self.tracker.get(d.take_train_outputs()) if isinstance(r, dict)])
                     for name, d in self.dist.items()}
        self.tracker.wait_all()  # every other outstanding call too (non-output ranks): errors must surface
        merged = merge_model_metrics(per_model)
        merged["train/steps"] = float(self._steps_this_episode)
        merged["train/skipped_batches"] = float(self._skipped_this_episode)
        self._steps_this_episode = self._skipped_this_episode = 0
        return merged

    def _uses_free_memory(self) -> bool:
        return any(self.config.models[name].free_memory for name in self.dist)

    def _sync_parameters(self, episode: int, metrics: dict[str, float]) -> None:
        for src, dst, synchronizer in self.sync_pairs:
            freq = self.config.models[src].sync_frequency
            if freq <= 0 or (episode + 1) % freq != 0:
                continue
            self._sync_pair(src, dst, synchronizer, metrics)

    def _sync_pair(self, src: str, dst: str, synchronizer: ParameterSynchronizer, metrics: dict[str, float],
                   new_version: bool = True) -> None:
        if (src, dst) in self._noop_sync:  # a side holds no weights (warned at start)
            metrics[f"sync/{src}->{dst}/noop"] = 1.0
            return
        self._phase(active={src, dst}, offload_others=False)
        stats = synchronizer.sync(self.dist[src], self.dist[dst])
        if new_version:
            self.weight_versions[dst] = self.weight_versions.get(dst, 0) + 1
        metrics[f"sync/{src}->{dst}/seconds"] = stats.get("seconds", 0.0)
        # The synchronizer's own numbers (bytes, buckets, export/load seconds, ...).
        metrics.update({f"sync/{src}->{dst}/{k}": float(v) for k, v in stats.items() if k != "seconds"})
        if self.runtime.validate_param_sync:
            checks = synchronizer.validate(self.dist[src], self.dist[dst]) or {}
            metrics.update({f"sync/{src}->{dst}/validate_{k}": float(v) for k, v in checks.items()})
        metrics[f"sync/{src}->{dst}/count"] = 1.0

    def _evaluates(self) -> bool:
        return self.evaluator is not None and self.evaluator.prompts is not None and \
            self.runtime.eval_episode_interval > 0

    def evaluate(self, episode: int) -> dict[str, float]:
        """Run the evaluator on its prompts; its metrics, named ``eval/<key>``."""
        if self.evaluator is None or self.evaluator.prompts is None:
            return {}
        return self.run_evaluation(episode)[0]

    def run_evaluation(self, episode: int, train_iteration: Optional[int] = None) -> tuple[dict[str, float], Any]:
        """``(metrics named eval/<key>, the post-processed results)`` of one evaluation
        (``Evaluator.process_results``; ``Evaluator.eval`` returns the second)."""
        self._phase(active=self._flow_models(self.evaluator))
        samples: list[dict] = []
        by_model: dict[str, list] = {}
        for batch, parts in self._run_flow(self.evaluator, self.eval_samples, episode):
            samples += split_batch(batch)
            for name, part in parts:
                by_model.setdefault(name, []).append(part)
        metrics, processed = self.evaluator.process_results(
            samples, by_model, episode, self.train_iteration if train_iteration is None else train_iteration)
        return {(k if k.startswith("eval/") else f"eval/{k}"): float(v) for k, v in metrics.items()}, processed

    # -- memory: colocated models with free_memory give memory back while idle ----
    def _flow_models(self, flow: BaseFlow) -> set[str]:
        return {node.model for node in flow.graph}

    def _phase(self, active: set[str], offload_others: bool = True) -> None:
        refs = []
        for name, d in self.dist.items():
            if not self.config.models[name].free_memory:
                continue
            want_loaded = name in active or (d.loaded and not offload_others)
            if d.loaded != want_loaded:
                refs += d.all_ranks("onload" if want_loaded else "offload")
                d.loaded = want_loaded
        self.tracker.get(refs)

    def _hook_all(self, method: str, **offered) -> None:
        """Hook ``method`` on every rank of every model (each takes what it accepts of ``offered``)."""
        self.tracker.get([ref for d in self.dist.values() for ref in d.hook(method, **offered)])

    # -- checkpoints -------------------------------------------------------------
    def _checkpointed_models(self) -> list[tuple[str, DistModel]]:
        """Only trainers change during a run: a frozen model reloads its config's weights, and an
        inference model fed by a trainer is re-synced from it on resume (``_maybe_resume``)."""
        return [(name, d) for name, d in self.dist.items() if d.trainable]

    def save_checkpoint(self, episode: int) -> None:
        """The run's position and every trainer's state, atomically (``chatlearn.runtime.checkpoint``);
        the oldest beyond ``max_data_ckpt_nums`` go."""
        def save_models(directory: str) -> None:
            refs = []
            for name, d in self._checkpointed_models():
                if _saves_itself(d.module) and name not in self._warned_1x_save:
                    self._warned_1x_save.add(name)
                    logger.warning("model %r: save_checkpoint(iteration) (ChatLearn 1.x's signature) saves where "
                                   "the module decides, as in 1.x; the engine's checkpoint holds the run's data "
                                   "position but not these weights. On resume the module's resume_training is "
                                   "True in setup(), where it loads its own save (1.x's pattern)", name)
                refs += d.hook("save_checkpoint", path=os.path.join(directory, name), iteration=self.train_iteration)
            self.tracker.get(refs)

        if self._streaming is not None:  # the batches in flight become part of the saved state
            self._streaming.drain()
        checkpoint.save_checkpoint(self.checkpoint_root, episode, self.runtime.max_data_ckpt_nums,
                                   self._data_state(episode), save_models)

    def _data_state(self, episode: int) -> dict[str, Any]:
        """Where the run is: what ``_load_data_state`` needs to continue after ``episode``."""
        return {
            "episode": episode,
            "prompts": self.prompt_data.state_dict(),
            "relay": self.relay.state_dict(),
            "rollout_processor": self.rollout_processor.state_dict() if self.rollout_processor else None,
            "iterations": {n: dict(d.iterations) for n, d in self.dist.items()},
            "weight_versions": dict(self.weight_versions),
            "history": self.history,
            "train_iteration": self.train_iteration,
            # policy_lag > 0: the generated, untrained episodes; a resumed run trains on them as kept.
            "in_flight": [r._asdict() for r in self._in_flight],
            # policy_lag_mode streaming: the generated batches not trained on, where generation stands.
            "streaming": self._streaming.state_dict() if self._streaming is not None else None,
        }

    def _load_data_state(self, state: dict[str, Any]) -> None:
        self.prompt_data.load_state_dict(state["prompts"])
        self.relay.load_state_dict(state["relay"])
        if self.rollout_processor is not None and state.get("rollout_processor") is not None:
            self.rollout_processor.load_state_dict(state["rollout_processor"])
        for name, d in self.dist.items():
            d.iterations.update(state["iterations"].get(name, {}))
        self.weight_versions = dict(state.get("weight_versions", {}))
        self.history = list(state["history"])
        self.train_iteration = int(state.get("train_iteration", 0))
        self._in_flight = collections.deque(Rollouts(**r) for r in state.get("in_flight", []))
        if len(self._in_flight) > self.runtime.policy_lag:
            raise ValueError(f"runtime.policy_lag: the checkpoint holds {len(self._in_flight)} generated, untrained "
                             f"episode(s), more than policy_lag={self.runtime.policy_lag} keeps; resume with the "
                             f"policy_lag the run was started with, or start a new run (new output_dir)")
        if self._streaming is not None:
            if state.get("streaming") is None:
                raise ValueError("runtime.policy_lag_mode streaming: the checkpoint is of a run without it; "
                                 "resume with the settings the run was started with, or use a new output_dir")
            self._streaming.load_state_dict(state["streaming"])
        elif state.get("streaming") is not None:
            raise ValueError("the checkpoint is of a run with runtime.policy_lag_mode streaming; resume with it, "
                             "or use a new output_dir")
        if self._in_flight:
            logger.info("resume: kept %d generated, untrained episode(s) from the checkpoint (sampled by policy "
                        "version(s) %s); they are trained on as in the interrupted run, not regenerated",
                        len(self._in_flight), sorted({r.version for r in self._in_flight}))

    def _check_resume_settings(self) -> None:
        interval = self.runtime.save_episode_interval
        for src, dst, _ in self.sync_pairs:
            freq = self.config.models[src].sync_frequency
            if interval and freq > 1 and interval % freq:
                logger.warning("models.%s.sync_frequency=%d and runtime.save_episode_interval=%d: a checkpoint "
                               "between two syncs restarts %s with %s's newer weights, so a resumed run is not "
                               "exactly the uninterrupted one; make save_episode_interval a multiple of "
                               "sync_frequency", src, freq, interval, dst, src)

    def _maybe_resume(self) -> None:
        if self._resume_from is None:
            return
        episode, path = self._resume_from
        self._load_data_state(checkpoint.load_data_state(path))
        # A module that saves itself (1.x's save_checkpoint(iteration)) loaded its save in setup().
        self.tracker.get([ref for name, d in self._checkpointed_models() if not _saves_itself(d.module)
                          for ref in d.hook("load_checkpoint", path=os.path.join(path, "models", name))])
        self.start_episode = episode + 1
        # Inference models whose weights come from a trainer (a vLLM policy keeps
        # no checkpoint of its own) take the restored trainer weights now, so the
        # next episode samples from the policy the interrupted run had.
        for src, dst, synchronizer in self.sync_pairs:
            self._sync_pair(src, dst, synchronizer, {}, new_version=False)
        logger.info("resumed from %s: continuing at episode %d", path, self.start_episode + 1)

    # -- teardown ----------------------------------------------------------------
    def stop(self) -> None:
        """ChatLearn 1.x's name for ``shutdown`` (``learn()`` already stops everything it started)."""
        self.shutdown()

    def shutdown(self) -> None:
        """Kill every worker (no hung processes), close outputs, stop a Ray we started."""
        self.running = False
        for d in self.dist.values():
            d.kill()
        self.dist.clear()
        self.tracker.discard()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._cluster is not None:
            stop_cluster(self._cluster)
            self._cluster = None


class EvalEngine(Engine):
    """Evaluation alone (ChatLearn 1.x): an evaluator flow over its prompts, no training.

        engine = EvalEngine(eval_flow).set_dataset(prompts)     # or EvalEngine(evaluator=...)
        results = engine.eval()   # the evaluator's post-processed results (by default
                                  # {model name: [output batch, ...]}, as in 1.x)

    Starts Ray and the evaluator's models, runs the evaluation once, and stops them.
    """

    def __init__(self, eval_flow: Optional[Callable] = None, evaluator: Optional[Evaluator] = None):
        if evaluator is None:
            if eval_flow is None:
                raise ValueError("EvalEngine needs an eval_flow function or an evaluator")
            evaluator = Evaluator(eval_flow)
        super().__init__(evaluator=evaluator)

    def set_dataset(self, prompts: list) -> "EvalEngine":
        if len(prompts) == 0:
            raise ValueError("set_dataset: the prompt list is empty")
        self.evaluator.set_dataset(prompts)
        return self

    def set_multiple_datasets(self, all_datasets: list[list]) -> "EvalEngine":
        self.evaluator.set_multiple_datasets(all_datasets)
        return self

    def learn(self) -> list[dict[str, float]]:
        raise ValueError("EvalEngine evaluates, it does not train: call engine.eval()")

    def eval(self, cur_iter: Optional[int] = None, train_iteration: Optional[int] = None) -> Any:
        """Run the evaluation; returns the post-processed results (its metrics are logged)."""
        if self.evaluator.prompts is None:
            raise ValueError("call engine.set_dataset(prompts) before engine.eval()")
        try:
            self._configure_logging()
            self._start_models()
            self._setup_data()
            metrics, processed = self.run_evaluation(-1 if cur_iter is None else cur_iter, train_iteration or 0)
            logger.info("evaluation: %s", full_summary(metrics))
            self.eval_metrics = metrics
            return processed
        finally:
            self.shutdown()


def _saves_itself(module: BaseModule) -> bool:
    """ChatLearn 1.x's ``save_checkpoint(iteration)``: the module saves where it decides (not
    under the engine's checkpoint directory) and reloads in ``setup()`` on resume."""
    params = inspect.signature(type(module).save_checkpoint).parameters
    return "iteration" in params and "path" not in params


def _peak_rss_gib() -> float:
    """The driver process's peak resident memory so far (the workers report theirs apart)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _batch_size(batch: dict) -> int:
    value = next(iter(batch.values()), [])
    return int(value.shape[0]) if isinstance(value, torch.Tensor) else len(value)


def _as_samples(dataset, dicts: bool = True) -> list:
    """The samples of what ``build_dataset`` returned (a list or a torch Dataset); dicts unless
    the Dataset batches them with its own ``collate_fn``."""
    samples = list(dataset) if not hasattr(dataset, "__getitem__") else [dataset[i] for i in range(len(dataset))]
    if dicts and samples and not isinstance(samples[0], dict):
        raise TypeError(f"build_dataset must produce dict samples (or a Dataset with a collate_fn); sample 0 is "
                        f"{type(samples[0]).__name__}")
    return samples


@contextlib.contextmanager
def _timed(sink: dict[str, float], key: str, on_start: Callable[[str], None]):
    on_start(key)
    start = time.perf_counter()
    try:
        yield
    finally:
        sink[key] = sink.get(key, 0.0) + time.perf_counter() - start
