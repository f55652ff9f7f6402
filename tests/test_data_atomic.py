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
