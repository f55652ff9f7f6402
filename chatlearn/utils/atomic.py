"""Crash-safe writes for checkpoints.

Files: written to a temp file in the same directory, flushed and fsynced, then
``os.replace``d over the target, and the directory fsynced, so a reader sees
either the old file or the complete new one.

Checkpoint directories: ``atomic_dir(final)`` yields a temp directory
(``<parent>/.tmp-<name>-<random>``) to fill. On a clean exit every file in it
is fsynced, a ``COMPLETE`` marker is written last, and the directory is renamed
to ``final``. On an exception the temp directory is deleted. A crash (power
loss, SIGKILL) can only leave a ``.tmp-*`` directory behind, which readers
ignore.

The ``COMPLETE`` marker is the checkpoint's manifest: the size and CRC-32 of
every file in it. ``verify_checkpoint`` checks them, so a checkpoint damaged
after it was written (a truncated or changed file, a missing one) is reported,
naming the file, and ``latest_intact_checkpoint`` falls back to the newest one
that is whole.

Layout used by ``atomic_checkpoint`` / ``latest_complete_checkpoint``:

    <root>/episode_000012/COMPLETE      # a finished checkpoint of episode 12
    <root>/.tmp-episode_000013-ab12cd/  # being written or abandoned: ignored

Only directories named ``episode_<digits>`` that contain ``COMPLETE`` count.
Workers on other hosts may write into the temp directory (shared filesystem);
commit happens when the driver's ``with`` block exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PREFIX = "episode_"
TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def fsync_dir(path: PathLike) -> None:
    """Persist a directory's entries (creations, renames) on POSIX filesystems."""
    if os.name != "posix":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: PathLike) -> Iterator[Any]:
    """Open a temp file next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    import torch  # only checkpointing callers pay for the import

    with _atomic_file(path) as f:
        torch.save(obj, f)


def _fsync_tree(root: Path) -> None:
    # Files written by other code (torch.save, backends) were not necessarily
    # fsynced; the rename must not become durable before their contents.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(final_dir: PathLike, marker_info: Optional[dict[str, Any]] = None) -> Iterator[Path]:
    """Build a directory under a temp name; rename it to ``final_dir`` only on success.

    An existing ``final_dir`` is replaced (e.g. an episode saved again after a resume).
    ``marker_info`` is stored as JSON in the ``COMPLETE`` marker.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        info = {"time": time.time(), **(marker_info or {}), "files": _manifest(tmp)}
        atomic_write_bytes(tmp / COMPLETE_MARKER, json.dumps(info).encode())
        if final.exists():
            # Move the old one to a temp name first: if we crash between the two
            # renames, the old copy is ignored rather than half-visible.
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_path(root: PathLike, episode: int) -> Path:
    return Path(root) / f"{CHECKPOINT_PREFIX}{episode:06d}"


def is_complete(path: PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(root: PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root`` as ``(episode, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_complete_checkpoint(root: PathLike) -> Optional[tuple[int, Path]]:
    """The newest finished checkpoint, or ``None``; half-written ones are skipped."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest(root: Path) -> dict[str, list[int]]:
    """``relative path -> [size, crc32]`` of every file under ``root`` (the marker excepted)."""
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != COMPLETE_MARKER:
                files[rel] = [path.stat().st_size, _file_crc32(path)]
    return files


def verify_checkpoint(path: PathLike) -> Optional[str]:
    """None if the checkpoint at ``path`` is whole, else what is wrong with it (naming the file).

    A checkpoint written before manifests existed (no file list in its marker) passes.
    """
    path = Path(path)
    marker = path / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return f"{marker}: unreadable manifest ({e})"
    for rel, (size, crc) in sorted(info.get("files", {}).items()):
        file = path / rel
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} has {actual} bytes, the manifest says {size}"
        if _file_crc32(file) != crc:
            return f"{file} does not match its checksum (changed after it was written)"
    return None


def latest_intact_checkpoint(root: PathLike, report=None) -> Optional[tuple[int, Path]]:
    """The newest finished checkpoint whose files match its manifest, or None.

    Damaged ones are skipped; ``report(message)`` (e.g. a logger's warning) hears
    about each, naming the damaged file.
    """
    for episode, path in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return episode, path
        if report is not None:
            report(f"checkpoint {path} is damaged and is skipped: {problem}")
    return None


def remove_abandoned(root: PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` directories a crash left under ``root`` (call only when no save runs)."""
    root = Path(root)
    if not root.is_dir():
        return []
    doomed = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def prune_checkpoints(root: PathLike, keep_last: Optional[int]) -> list[Path]:
    """Delete all but the newest ``keep_last`` finished checkpoints (None/0 keeps all).

    Returns the deleted paths. Temp directories are left alone: one may belong
    to a save in progress.
    """
    if not keep_last or keep_last < 0:
        return []
    doomed = [path for _, path in complete_checkpoints(root)[:-keep_last]]
    return _delete_checkpoints(doomed)


def set_aside_checkpoints_after(root: PathLike, episode: int) -> Optional[Path]:
    """Move the finished checkpoints newer than ``episode`` into ``<root>/superseded-<time>/``
    (a run resumed from an older checkpoint starts another history; nothing is deleted)."""
    newer = [path for ep, path in complete_checkpoints(root) if ep > episode]
    if not newer:
        return None
    target = Path(root) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(parents=True, exist_ok=True)
    for path in newer:
        os.replace(path, target / path.name)
    fsync_dir(root)
    return target


def _delete_checkpoints(doomed: list[Path]) -> list[Path]:
    for path in doomed:
        # Drop the marker first so a crash mid-delete leaves an ignored directory.
        with contextlib.suppress(FileNotFoundError):
            (path / COMPLETE_MARKER).unlink()
        shutil.rmtree(path, ignore_errors=True)
    return doomed


@contextlib.contextmanager
def atomic_checkpoint(root: PathLike, episode: int, keep_last: Optional[int] = None) -> Iterator[Path]:
    """``atomic_dir`` for ``<root>/episode_<episode>``, then prune to ``keep_last``."""
    with atomic_dir(checkpoint_path(root, episode), marker_info={"episode": episode}) as tmp:
        yield tmp
    prune_checkpoints(root, keep_last)
