"""`chatlearn validate`: output, exit codes, speed (no torch/Ray/vLLM imports)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "examples", "toy", "configs", "rlhf.yaml")


def run_cli(*args: str, env: dict | None = None, cwd: str = ROOT) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("num_episode", "num_cpu_policy")}
    full_env["PYTHONPATH"] = ROOT
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "chatlearn.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60)


def test_validate_prints_config_and_placement():
    start = time.monotonic()
    proc = run_cli("validate", TOY, "runtime.num_episode=2", "--device", "cpu", env={"num_cpu_policy": "1"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "runtime:\n" in out and "  num_episode: 2\n" in out
    assert "    num_cpu: 1\n" in out  # from the environment knob
    assert "model_config_file: " + os.path.join(os.path.dirname(TOY), "policy_inference.yaml") in out
    table = out[out.index("# placement plan (cpu run)"):].splitlines()
    assert table[1].split()[:8] == ["model", "device", "devices", "TP", "PP", "replicas/DP", "slots", "colocation"]
    rows = {line.split()[0]: line.split() for line in table[3:9]}
    assert set(rows) == {"policy", "reference", "reward", "value", "ppo_policy", "ppo_value"}
    assert rows["policy"][-1] == "policy,ppo_policy" and rows["policy"][-2] == "0"  # colocated: shares slot 0
    assert rows["ppo_policy"][-2] == "0-1"
    assert "1 (DP 2)" in " ".join(rows["ppo_policy"])
    assert table[9].startswith("device: cpu; total: ")
    assert elapsed < 5, f"chatlearn validate took {elapsed:.1f}s"


def test_validate_accepts_the_example_configs():
    """The committed example configs validate as shipped (no environment knobs set), on both kinds of run."""
    knobs = ("num_episode", "sample_per_episode", "data_path", "num_cpu_policy", "policy_tp", "num_gpu_policy",
             "output_dir", "exp_name", "ray_address")
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    for config in (TOY, os.path.join(ROOT, "configs", "example.yaml")):
        for device in ("cpu", "gpu"):
            proc = subprocess.run([sys.executable, "-m", "chatlearn.cli", "validate", config, "--device", device],
                                  capture_output=True, text=True, env={**env, "PYTHONPATH": ROOT}, cwd=ROOT,
                                  timeout=60)
            assert proc.returncode == 0, (config, device, proc.stderr)
            assert f"# placement plan ({device} run)" in proc.stdout


def test_validate_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  policy:\n    num_cpus: 1\nruntime:\n  num_episode: abc\n")
    proc = run_cli("validate", str(bad), "runtime.seed=-3", cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [
        f"chatlearn validate: 4 problems in {bad}:",
        "  bad.yaml: models.policy.num_cpus: unknown key 'num_cpus'; did you mean 'num_cpu'?",
        "  bad.yaml: runtime.num_episode: expected int, got 'abc' (str)",
        "  <overrides>: runtime.seed: expected a value in [0, 4294967295], got -3",
        "  bad.yaml: models.policy: expected num_gpu or num_cpu > 0 (the model needs devices), "
        "got num_gpu=0, num_cpu=0",
    ]


def test_missing_file_and_usage_exit_2(tmp_path):
    proc = run_cli("validate", str(tmp_path / "nothing.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    assert run_cli().returncode == 2
    assert run_cli("validate").returncode == 2


def test_cli_imports_no_heavy_modules():
    code = ("import sys; from chatlearn.cli import main; rc = main(['validate', %r, '--device', 'auto']); "
            "heavy = sorted(m for m in ('torch', 'ray', 'vllm', 'megatron') if m in sys.modules); "
            "print('HEAVY', heavy); sys.exit(rc)" % TOY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
