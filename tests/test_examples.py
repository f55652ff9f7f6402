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


def test_toy_rlhf_example_on_an_existing_ray_cluster(tmp_path):
    """runtime.ray_address: the engine joins a running cluster instead of starting Ray."""
    import shutil
    import socket
    import tempfile
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # Ray's unix sockets live under --temp-dir, and a socket path is limited to
    # 107 bytes: pytest's tmp_path is too deep for it.
    ray_tmp = tempfile.mkdtemp(prefix="clray", dir="/tmp")
    # A cluster with token authentication, as Ray sets up by default once a
    # token exists; the driver must be told to use it (Ray does not infer it).
    token = os.path.join(ray_tmp, "token")
    with open(token, "w") as f:
        f.write("chatlearn-test-token-0123456789abcdef")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token}
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=8", "--include-dashboard=false",
         f"--temp-dir={ray_tmp}"],
        env={**os.environ, **auth}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(8)
        assert head.poll() is None, "the Ray head node did not start"
        env = {**os.environ, **auth, "num_episode": "1", "output_dir": str(tmp_path / "out"),
               "ray_address": f"127.0.0.1:{port}"}
        run = subprocess.run([sys.executable, "examples/toy/train_rlhf.py", "-c", "examples/toy/configs/rlhf.yaml"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Connecting to existing Ray cluster" in run.stderr
        assert "Started a local Ray instance" not in run.stderr
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
