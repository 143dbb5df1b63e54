"""Decode caches: files built once and then shared by every process of a run and by later runs."""

import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path


def build_once(manifest: Path, build: Callable[[], None]):
    """Run build(), which must write the manifest last, unless the manifest is already there. An exclusive lock on
    <manifest>.lock lets one process build while every other one (on this machine, or on another sharing the folder:
    Linux maps flock to NFS locks) waits for as long as building takes; no collective barrier, which would time out
    on a large data set."""
    if manifest.is_file():  # present means complete: no lock needed
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.with_suffix(".lock"), "a") as lock:  # "a": create it, never truncate it
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, also when the process dies
        if not manifest.is_file():
            build()


def temporary_name(path: Path) -> Path:
    """A name beside path unique per machine and process: written there, then renamed, a file is never seen half
    written."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "launchkit"
