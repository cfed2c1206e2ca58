"""The machine-local cache every part shares ($FASTGRPO_CACHE, else ~/.cache/fastgrpo: fixtures,
their drafts, calibrations, the CPU linears' tuned choice) and the file lock that keeps concurrent
writers of one entry from doing its work twice."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "FASTGRPO_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $FASTGRPO_CACHE, else ~/.cache/fastgrpo."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "fastgrpo"


@contextmanager
def locked(lock_path: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive fcntl lock on `lock_path` (created if missing) while the block runs; on_wait is
    told when another holder makes it wait."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for another holder of {lock_path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
