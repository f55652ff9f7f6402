"""Shared by the benchmarks: name the machine, and keep one section per benchmark in RESULTS.md."""
from __future__ import annotations

import json
import os
import platform
import re
import sys
from typing import Any, Optional

RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADER = ("# Benchmark results\n\nEach section is rewritten by the benchmark named in it; numbers come from the "
          "command and machine it names. Ratios are measured side by side in one run.\n")


def machine_name(device: str = "cpu") -> str:
    """CPU model and core count, plus the GPU name and count on a GPU run."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} cores"
    if device == "gpu":
        import torch

        name = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}; {name}"
    return name


def update_results_section(title: str, body: str, path: str = RESULTS_MD) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md."""
    text = open(path).read() if os.path.exists(path) else HEADER
    section = f"## {title}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")


def save_results(name: str, data: Any) -> str:
    """Write ``benchmarks/results/<name>.json``; returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def command_line(script: str, argv: Optional[list[str]] = None) -> str:
    """The command as a user would type it: ``python benchmarks/<script> ARGS`` (``argv`` None: this
    process's arguments)."""
    return f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
