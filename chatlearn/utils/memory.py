"""Peak memory of a whole job: the driver and every process below it (Ray's
raylet and workers, vLLM engines), sampled in a background thread."""
from __future__ import annotations

import threading

import psutil


def tree_rss_bytes(pid: int | None = None) -> int:
    """Sum of the resident set sizes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakRSSMonitor:
    """``with PeakRSSMonitor() as mon: ...`` then ``mon.peak_bytes``.

    RSS sums count pages shared between processes more than once, so this is
    an upper bound of the job's real footprint.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSSMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss_bytes())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30
