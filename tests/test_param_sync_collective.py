"""The ``collective`` weight-sync transport (chatlearn/synchronizer/collective.py).

Default suite: a writer and two receivers in three processes (one per GPU over NCCL on a machine
with GPUs) broadcast a state dict through the bucket manifest, twice (the group and the receive buffers are kept), and every tensor arrives
bit-exact, in bucket order, including from buckets received before the last one. Slow: a
Megatron TP2 trainer syncs into two vLLM replicas and into one vLLM TP2 engine (its worker
processes join the group) through the Ray engine, every sync validated.
"""
from __future__ import annotations

import os

import pytest
import torch

from chatlearn.synchronizer import buckets, collective
from chatlearn.utils.launch import spawn


def _state(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    return {"a.weight": torch.randn(64, 32, generator=g), "a.bias": torch.randn(64, generator=g),
            "b.weight": torch.randn(200, 16, generator=g).to(torch.bfloat16),
            "c.steps": torch.arange(1000, dtype=torch.int64) * version}


def _member(rank: int, world: int, port: int, out_dir: str) -> None:
    # On a GPU machine ``spawn`` gave this rank a GPU of its own: the group is NCCL.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    collective.join("pair", "127.0.0.1", port, rank, world, secret="s3")
    for version in (1, 2):
        state = _state(version)
        if rank == 0:
            on_device = {name: t.to(device) for name, t in state.items()}
            manifest = buckets.write_buckets(on_device, 4096, buckets.COLLECTIVE, channel="pair")
            assert len(manifest["buckets"]) >= 3 and "path" not in manifest["buckets"][0]
            torch.save(manifest, os.path.join(out_dir, f"manifest{version}.pt"))
            collective.send("pair")
        else:
            import time

            path = os.path.join(out_dir, f"manifest{version}.pt")
            while not os.path.exists(path):  # the manifest reaches receivers through the driver in the engine
                time.sleep(0.05)
            time.sleep(0.2)
            got = list(buckets.iter_manifest(torch.load(path)))  # every view kept until the end
            assert [name for name, _ in got] == list(state)
            for name, tensor in got:
                assert tensor.device.type == device, name
                assert tensor.dtype == state[name].dtype and torch.equal(tensor.cpu(), state[name]), name


def test_a_broadcast_reaches_every_receiver_bit_exact_twice(tmp_path):
    """gloo on CPU, three processes; NCCL where there are GPUs, one process per GPU (up to three)."""
    world = min(3, torch.cuda.device_count()) if torch.cuda.is_available() else 3
    if world < 2:
        pytest.skip("NCCL needs a GPU per member of the group, this machine has one")
    port = collective.free_port()
    spawn(_member, world, port, str(tmp_path))


def test_receiving_without_joining_names_the_channel():
    manifest = {"transport": buckets.COLLECTIVE, "channel": "nobody", "buckets": [{"nbytes": 8, "tensors": []}]}
    with pytest.raises(RuntimeError, match="nobody.*not joined"):
        list(buckets.iter_manifest(manifest))
