"""What a run prints: the episode line, the progress heartbeat, and the dependency filters."""
import logging
import os
import time
import warnings

from chatlearn.runtime.console import Progress, episode_summary, format_seconds
from chatlearn.utils import dependency_logs

PPO_EPISODE = {
    "samples/environment": 16, "reward/mean": 0.4123, "kl": 0.01234, "loss/policy": -0.0312, "loss/value": 0.2,
    "clipfrac": 0.1, **{f"sync/ppo_policy->policy/metric_{i}": 1.5 for i in range(30)},
    "eval/reward/mean": 0.53, "eval/reward/fn": 0.31, "eval/response_length/mean": 2.4,
    "time/environment": 1.234, "time/train": 0.8, "time/sync": 0.12, "time/eval": 0.5,
    "time/policy.forward_step": 1.1,
}


def test_the_episode_line_shows_the_watched_metrics_and_phases_only():
    line = episode_summary(PPO_EPISODE)
    assert line == ("reward 0.412 kl 0.0123 loss/policy -0.0312 | eval reward 0.53 (fn 0.31)"
                    " | env 1.2s train 0.8s sync 0.1s eval 0.5s")


def test_the_main_loss_of_an_algorithm_without_a_policy_loss():
    assert episode_summary({"loss/value": 0.5, "loss/aux": 1.0}) == "loss/aux 1"
    assert episode_summary({"eval/accuracy": 0.25, "reward/mean": 2e-4}) == "reward 2.0e-04 | eval/accuracy 0.25"
    assert episode_summary({}) == ""


def test_a_run_logged_to_a_file_gets_short_lines_with_an_eta(caplog):
    logger = logging.getLogger("chatlearn.test_console")
    progress = Progress(2, 10, logger, interval_s=0, terminal=False)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for episode in range(2, 5):
            progress.episode_done(episode, PPO_EPISODE)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" | ")[0] for line in lines] == ["episode 3/10", "episode 4/10", "episode 5/10"]
    assert all(line.endswith(", eta 0:00") and len(line) < 150 for line in lines), lines
    assert "sync/" not in lines[0]


def test_debug_prints_every_metric(caplog):
    logger = logging.getLogger("chatlearn.test_console")
    progress = Progress(0, 1, logger, interval_s=0, verbose=True, terminal=False)
    with caplog.at_level(logging.INFO, logger=logger.name):
        progress.episode_done(0, PPO_EPISODE)
    assert "sync/ppo_policy->policy/metric_29=1.5" in caplog.records[0].getMessage()


def test_a_long_episode_gets_a_heartbeat_naming_its_phase(caplog):
    logger = logging.getLogger("chatlearn.test_console")
    with caplog.at_level(logging.INFO, logger=logger.name):
        progress = Progress(0, 3, logger, interval_s=0.2, terminal=False)
        progress.phase("environment", 0)
        time.sleep(5.5)  # the heartbeat thread wakes at most every 5 s
        progress.close()
    beats = [r.getMessage() for r in caplog.records]
    assert beats and beats[0].startswith("episode 1/3: environment for 0:0"), beats


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 61, 3725)] == ["0:00", "1:01", "1:02:05"]


def test_dependency_noise_is_dropped_and_other_messages_are_not(caplog):
    dependency_logs.quiet_dependencies(verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        dependency_logs.quiet_dependencies(verbose=False)  # catch_warnings reset the filters
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("something a user must see", UserWarning)
    assert [str(w.message) for w in caught] == ["something a user must see"]
    ray_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING):
        ray_logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
        ray_logger.warning("Token authentication is disabled for this Ray cluster.")
    assert [r.getMessage() for r in caplog.records if r.name == ray_logger.name] == [
        "Token authentication is disabled for this Ray cluster."]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_vllm_per_reload_messages_are_dropped():
    vllm_logger = logging.getLogger("vllm")
    handler, level = _Collect(), vllm_logger.level
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    try:
        dependency_logs.quiet_dependencies(verbose=False)
        child = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        child.warning("%s: Failed to load weights", "RotaryEmbedding")
        child.warning("%s: Failed to load weights", "QKVParallelLinear")
        logging.getLogger("vllm.v1.core.block_pool").info("Successfully reset prefix cache")
    finally:
        vllm_logger.removeHandler(handler)
        vllm_logger.setLevel(level)
    assert handler.messages == ["QKVParallelLinear: Failed to load weights"]


def test_vllm_logs_warnings_only_unless_the_user_asks(monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # the user's choice stands
    dependency_logs.quiet_dependencies(verbose=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    dependency_logs.quiet_dependencies(verbose=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"


def test_the_cpp_numa_notice_is_dropped_from_stderr_and_the_rest_written_back(capfd):
    import torch

    with dependency_logs.drop_cpp_start_messages(verbose=False):
        os.write(2, b"[W1129 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation\n")
        os.write(2, b"a C++ warning a user needs\n")
        torch.ops.aten.ones  # the block runs normally
    assert capfd.readouterr().err == "a C++ warning a user needs\n"


def test_stderr_is_written_back_when_the_engine_start_fails(capfd):
    try:
        with dependency_logs.drop_cpp_start_messages(verbose=False):
            os.write(2, b"why it failed\n")
            raise RuntimeError("engine start")
    except RuntimeError:
        pass
    assert capfd.readouterr().err == "why it failed\n"


def test_what_a_crashing_engine_start_prints_reaches_stderr():
    """Copied as it comes, not held: a process that dies inside the block (a native crash in
    vLLM's start) still leaves its last words in the log."""
    import subprocess
    import sys

    script = ("import os, time\n"
              "from chatlearn.utils import dependency_logs\n"
              "with dependency_logs.drop_cpp_start_messages(verbose=False):\n"
              "    os.write(2, b'Warning: NUMA binding: Using MEMBIND policy\\n')\n"
              "    os.write(2, b'why the engine died\\n')\n"
              "    time.sleep(0.5)\n"
              "    os._exit(3)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert run.stderr == "why the engine died\n"
