import pytest
import torch

from chatlearn.utils.atomic import (
    COMPLETE_MARKER,
    atomic_checkpoint,
    atomic_dir,
    atomic_torch_save,
    atomic_write_bytes,
    checkpoint_path,
    latest_complete_checkpoint,
)


def test_atomic_file_writes(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "s.pt")
    assert torch.equal(torch.load(tmp_path / "s.pt")["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f.bin", "s.pt", "sub"]


def test_crash_inside_atomic_dir_leaves_no_checkpoint(tmp_path):
    with atomic_checkpoint(tmp_path, 1) as d:
        atomic_torch_save({"ep": 1}, d / "data.pt")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_checkpoint(tmp_path, 2) as d:
            (d / "data.pt").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not checkpoint_path(tmp_path, 2).exists()
    assert list(tmp_path.iterdir()) == [checkpoint_path(tmp_path, 1)]
    episode, path = latest_complete_checkpoint(tmp_path)
    assert episode == 1 and torch.load(path / "data.pt") == {"ep": 1}


def test_latest_skips_half_written_dirs(tmp_path):
    assert latest_complete_checkpoint(tmp_path / "missing") is None
    with atomic_dir(checkpoint_path(tmp_path, 3)):
        pass
    # A crashed save (temp name) and a dir without the marker are both ignored.
    (tmp_path / ".tmp-episode_000009-xyz").mkdir()
    (tmp_path / ".tmp-episode_000009-xyz" / COMPLETE_MARKER).write_text("{}")
    checkpoint_path(tmp_path, 8).mkdir()
    assert latest_complete_checkpoint(tmp_path) == (3, checkpoint_path(tmp_path, 3))


def test_keep_last_and_resave(tmp_path):
    for ep in range(4):
        with atomic_checkpoint(tmp_path, ep, keep_last=2) as d:
            (d / "v").write_text(str(ep))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode_000002", "episode_000003"]
    with atomic_checkpoint(tmp_path, 3, keep_last=2) as d:
        (d / "v").write_text("again")
    assert (checkpoint_path(tmp_path, 3) / "v").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode_000002", "episode_000003"]


def _save(root, episode, files):
    with atomic_checkpoint(root, episode) as d:
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)


def test_manifest_names_the_damaged_file_and_the_newest_intact_one_is_used(tmp_path):
    from chatlearn.utils.atomic import latest_intact_checkpoint, set_aside_checkpoints_after, verify_checkpoint

    for ep in range(3):
        _save(tmp_path, ep, {"data_state.pt": b"x" * 64, "models/a/rank_000.pt": bytes([ep]) * 32})
    newest = checkpoint_path(tmp_path, 2)
    assert verify_checkpoint(newest) is None
    (newest / "data_state.pt").write_bytes(b"x" * 10)  # truncated
    assert verify_checkpoint(newest) == f"{newest / 'data_state.pt'} has 10 bytes, the manifest says 64"
    middle = checkpoint_path(tmp_path, 1)
    (middle / "models/a/rank_000.pt").write_bytes(b"\xff" * 32)  # same size, other bytes
    assert "does not match its checksum" in verify_checkpoint(middle)
    reports = []
    assert latest_intact_checkpoint(tmp_path, report=reports.append) == (0, checkpoint_path(tmp_path, 0))
    assert len(reports) == 2 and "data_state.pt has 10 bytes" in reports[0] and "rank_000.pt" in reports[1]
    (checkpoint_path(tmp_path, 0) / "data_state.pt").unlink()
    assert verify_checkpoint(checkpoint_path(tmp_path, 0)).endswith("data_state.pt is missing")
    aside = set_aside_checkpoints_after(tmp_path, 0)
    assert sorted(p.name for p in aside.iterdir()) == ["episode_000001", "episode_000002"]
    assert latest_complete_checkpoint(tmp_path)[0] == 0  # nothing deleted, the newer ones moved away


def test_abandoned_temp_dirs_are_removed(tmp_path):
    from chatlearn.utils.atomic import remove_abandoned

    _save(tmp_path, 0, {"a": b"1"})
    (tmp_path / ".tmp-episode_000001-abc").mkdir()
    assert [p.name for p in remove_abandoned(tmp_path)] == [".tmp-episode_000001-abc"]
    assert [p.name for p in tmp_path.iterdir()] == ["episode_000000"]


def test_metrics_are_cut_back_to_the_resume_point(tmp_path):
    from chatlearn.utils.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for ep in (-1, 0, 1, 2):
        writer.write(ep, {"m": float(ep)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"episode": 3, "m"')  # torn by a crash mid-write
    assert [r["episode"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [-1, 0, 1, 2]
    resumed = MetricsWriter(str(tmp_path), start_episode=2, tensorboard=False)
    resumed.write(2, {"m": 2.0})
    resumed.close()
    assert [r["episode"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [-1, 0, 1, 2]
    fresh = MetricsWriter(str(tmp_path), start_episode=0, tensorboard=False)
    fresh.close()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == []
