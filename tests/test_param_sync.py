"""Bucketed weight transport (chatlearn.synchronizer.buckets) and the vLLM
shard-checksum merge, without engines: fast, real files in /dev/shm, real Ray."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from chatlearn.models.vllm_module import cpu_thread_binding
from chatlearn.synchronizer import buckets, vllm_sync
from chatlearn.synchronizer.base import choose_transport


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "lm_head.weight": torch.randn(50, 16, generator=gen),
        "model.embed_tokens.weight": torch.randn(50, 16, generator=gen),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 40, generator=gen),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(7, generator=gen),  # odd size: alignment
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(16, generator=gen).to(torch.float16),
        "model.layers.0.empty": torch.zeros(0),
    }


def test_plan_buckets_respects_the_size_and_keeps_order():
    state = _state()
    limit = 4000
    planned = buckets.plan_buckets(state, limit)
    names = [e[0] for b in planned for e in b["tensors"]]
    assert names == list(state)  # order kept (layer tensors stay adjacent)
    for b in planned:
        assert b["nbytes"] <= limit or len(b["tensors"]) == 1  # an oversize tensor travels alone
        for name, dtype, shape, offset, nbytes in b["tensors"]:
            assert offset % buckets.ALIGN == 0
            assert nbytes == state[name].numel() * state[name].element_size()
            assert dtype == str(state[name].dtype).removeprefix("torch.") and shape == list(state[name].shape)
    assert len(planned) > 1
    # A 3200-byte tensor fits; a limit below it gives it a bucket of its own.
    alone = buckets.plan_buckets(state, 1000)
    assert [len(b["tensors"]) for b in alone][:2] == [1, 1]
    with pytest.raises(ValueError, match="positive"):
        buckets.plan_buckets(state, 0)
    with pytest.raises(TypeError, match="not a tensor"):
        buckets.plan_buckets({"x": [1, 2]}, 100)


def test_shm_round_trip_reuses_its_files_and_cleans_up():
    state = _state(1)
    pool = buckets.ShmBucketPool("test-roundtrip")
    try:
        manifest = pool.write(state, 4000)
        assert manifest["transport"] == buckets.SHM
        paths = [b["path"] for b in manifest["buckets"]]
        assert all(p.startswith(pool.directory) and os.path.getsize(p) >= 1 for p in paths)
        got = dict(buckets.iter_manifest(manifest))
        assert list(got) == list(state)
        for name, tensor in state.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        assert buckets.manifest_shapes(manifest) == {k: tuple(v.shape) for k, v in state.items()}
        assert buckets.manifest_nbytes(manifest) == sum(v.numel() * v.element_size() for v in state.values())

        # Second sync with new values: same files (same inodes), new contents,
        # read through the mappings the reader kept from the first read.
        inodes = [os.stat(p).st_ino for p in paths]
        kept = {p: buckets._READ_MAPS[p][2] for p in paths}
        new_state = _state(2)
        manifest2 = pool.write(new_state, 4000)
        assert [os.stat(b["path"]).st_ino for b in manifest2["buckets"]] == inodes
        copies = buckets.materialize(manifest2)
        assert all(torch.equal(copies[k], v) for k, v in new_state.items())
        assert all(buckets._READ_MAPS[p][2] is kept[p] for p in paths)
        # Fewer buckets later: the extra files go.
        manifest3 = pool.write({"a": torch.ones(3)}, 4000)
        assert len(manifest3["buckets"]) == 1 and not os.path.exists(paths[-1])
    finally:
        pool.close()
    assert not os.path.exists(pool.directory)
    assert not any(p.startswith(pool.directory) for p in buckets._READ_MAPS)  # no unlinked file kept alive


def test_shm_space_is_checked_before_writing(tmp_path):
    # A write into a full tmpfs mapping is a SIGBUS, so the space is checked
    # first. An expanded view reports a huge size without using memory.
    pool = buckets.ShmBucketPool("test-space", root=str(tmp_path))
    too_big = buckets.shm_available_bytes(str(tmp_path)) + 2**30
    with pytest.raises(buckets.ShmSpaceError, match="object_store"):
        pool.write({"w": torch.empty(1, dtype=torch.uint8).expand(too_big)}, 2**62)
    assert not os.path.exists(pool.directory)  # nothing written
    pool.close()


def test_stale_pools_are_those_whose_owner_lock_is_free(tmp_path):
    """A pool is live while its writer holds its lock, whatever pid its name carries (another
    PID namespace sharing /dev/shm may reuse or not know the pid): only free locks are stale."""
    def pool_dir(name):
        d = tmp_path / f"chatlearn-sync-{name}"
        d.mkdir()
        (d / "bucket-00000.bin").write_bytes(b"123")
        (d / buckets._OWNER_LOCK).touch()
        return d

    stale = pool_dir("1-dead")  # lock file, nobody holds it
    held = pool_dir("2-other-namespace")  # a pid that means nothing here, but the lock is held
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(held / buckets._OWNER_LOCK)], stdout=subprocess.PIPE,
        text=True)
    young = tmp_path / f"chatlearn-sync-{os.getppid()}-being-created"  # no lock yet; its writer lives
    young.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    legacy = tmp_path / f"chatlearn-sync-{int(dead.stdout)}-older-chatlearn"  # no lock, writer gone
    legacy.mkdir()
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert sorted(buckets.remove_stale_pools(str(tmp_path))) == sorted([stale.name, legacy.name])
        assert held.exists() and young.exists() and not stale.exists()
    finally:
        holder.kill()
        holder.wait()
    assert buckets.remove_stale_pools(str(tmp_path)) == [held.name]  # its writer is gone now


def test_a_pool_holds_its_lock_while_it_lives(tmp_path):
    pool = buckets.ShmBucketPool("lock-test", root=str(tmp_path))
    pool.write({"w": torch.ones(4)}, 2**20)
    assert buckets.remove_stale_pools(str(tmp_path)) == []
    pool.close()
    assert not os.path.exists(pool.directory)


def test_object_store_round_trip(ray_session):
    state = _state(3)
    manifest = buckets.write_buckets(state, 4000, buckets.OBJECT_STORE)
    assert manifest["transport"] == buckets.OBJECT_STORE and len(manifest["buckets"]) > 1
    got = buckets.materialize(manifest)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items())
    # Spilled to shm for readers that are no Ray workers (vLLM's TP worker processes).
    spilled = buckets.spill_to_shm(manifest, "test-spill")
    try:
        assert spilled["transport"] == buckets.SHM
        again = dict(buckets.iter_manifest(spilled))
        assert all(torch.equal(again[k], v) for k, v in state.items())
    finally:
        buckets.shm_pool("test-spill").close()
    with pytest.raises(ValueError, match="transport"):
        buckets.write_buckets(state, 100, "carrier-pigeon")


def test_merge_shard_checksums_adds_slices():
    full = torch.randn(8, 6, dtype=torch.float64)
    want = vllm_sync.checksums({"w": full, "norm": full[0]})["w"]
    # Two ranks: the row slices add up; a replicated tensor is divided by its copies.
    ranks = [{"w": (float(full[:4].sum()), float(full[:4].abs().sum())),
              "norm": (float(full[0].sum()) / 2, float(full[0].abs().sum()) / 2)},
             {"w": (float(full[4:].sum()), float(full[4:].abs().sum())),
              "norm": (float(full[0].sum()) / 2, float(full[0].abs().sum()) / 2)}]
    merged = vllm_sync.merge_shard_checksums(ranks)
    assert merged["w"] == pytest.approx(want, rel=1e-12)
    assert merged["norm"] == pytest.approx((float(full[0].sum()), float(full[0].abs().sum())), rel=1e-12)
    with pytest.raises(RuntimeError, match="rank 1"):
        vllm_sync.merge_shard_checksums([{"a": (0, 0)}, {"b": (0, 0)}])


def test_check_incoming_weights_accepts_manifest_shapes():
    expected = {"a": (2, 3), "b": (4,)}
    vllm_sync.check_incoming_weights({"a": (2, 3), "b": [4]}, expected, "policy")
    with pytest.raises(ValueError, match=r"policy.*b has shape \(4,\), sync sent \(5,\)"):
        vllm_sync.check_incoming_weights({"a": (2, 3), "b": (5,)}, expected, "policy")
    with pytest.raises(KeyError, match="missing"):
        vllm_sync.check_incoming_weights({"a": (2, 3)}, expected, "policy")


def test_cpu_thread_binding():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_thread_binding(3, [4, 5]) == "4|5|4"


def test_choose_transport_by_where_the_processes_are():
    pair = "param sync a -> b"
    # CPU: shm on one host, the object store across hosts; collective only when asked.
    assert choose_transport("auto", True, 0, [[]], [[], []], pair) == ("auto", [0, 0])
    assert choose_transport("auto", False, 0, [[]], [[]], pair) == (buckets.OBJECT_STORE, [0])
    assert choose_transport(buckets.COLLECTIVE, True, 0, [[]], [[]], pair) == (buckets.COLLECTIVE, [0])
    # Each receiver on the GPU of a trainer rank reads that rank's buffers.
    assert choose_transport("auto", True, 0, [["g0"], ["g1"]], [["g1"], ["g0"]], pair) == \
        (buckets.CUDA_IPC, [1, 0])
    # Receivers on GPUs of their own: NCCL, from the output rank.
    assert choose_transport("auto", True, 1, [["g0"], ["g1"]], [["g2"], ["g3", "g4"]], pair) == \
        (buckets.COLLECTIVE, [1, 1])
    # A tensor-parallel engine over the trainer's own GPUs: not one process per GPU (no CUDA IPC),
    # and NCCL cannot hold two members on one GPU: /dev/shm.
    assert choose_transport("auto", True, 0, [["g0"], ["g1"]], [["g0", "g1"]], pair) == ("auto", [0])
    with pytest.raises(ValueError, match="two members on one GPU"):
        choose_transport(buckets.COLLECTIVE, True, 0, [["g0"]], [["g0", "g1"]], pair)
    with pytest.raises(ValueError, match="cuda_ipc needs every receiver"):
        choose_transport(buckets.CUDA_IPC, True, 0, [["g0"]], [["g1"]], pair)
