"""The example entry scripts run as a user runs them."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_rlhf_example_runs_and_resumes(tmp_path):
    env = {**os.environ, "num_episode": "2", "save_episode_interval": "1", "output_dir": str(tmp_path)}
    cmd = [sys.executable, "examples/toy/train_rlhf.py", "-c", "examples/toy/configs/rlhf.yaml"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "peak RSS:" in first.stdout and first.stdout.count("\n      ") >= 2
    assert os.path.exists(tmp_path / "toy_rlhf" / "checkpoints" / "episode_000001" / "COMPLETE")

    # Run again with more episodes: it continues after the last checkpoint.
    again = subprocess.run(cmd, cwd=ROOT, env={**env, "num_episode": "3"}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing at episode 3" in again.stderr
    lines = (tmp_path / "toy_rlhf" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
