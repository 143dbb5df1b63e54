"""Decode caches: an array file built once, then mapped by every process of a run and by later runs, and beside it
its manifest, written last: the task's record of what the array holds, the array's size and a CRC-32 of each of its
chunks. An entry found damaged (truncated, overwritten, its manifest garbled) is built again, with a message saying
what was wrong."""

import contextlib
import fcntl
import json
import os
import secrets
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

CHUNK = 1 << 20
# Opening an entry checks this many chunks spread over its array (6-17 ms from the page cache), which finds an array
# overwritten as a whole; LAUNCHKIT_VERIFY_CACHE=1 checks every chunk (0.03-0.1 s per 100 MB, same).
SAMPLED_CHUNKS = 16


def build_once(array: Path, build: Callable[[Callable[[bytes], None]], dict]) -> dict:
    """The record that build(write) returned after writing the array through write(). Built unless a complete entry
    that passes its check is there. An exclusive lock on <array>.lock lets one process build while every other one
    (on this machine, or on another sharing the folder: Linux maps flock to NFS locks) waits for as long as building
    takes; no collective barrier, which would time out on a large data set."""
    manifest = array.with_suffix(".json")
    record, _ = _checked(array, manifest)
    if record is not None:  # complete and intact: no lock needed
        with contextlib.suppress(OSError):  # marked used, for scripts/manage_cache.py prune (a read-only cache stays)
            os.utime(manifest)
        return record
    array.parent.mkdir(parents=True, exist_ok=True)
    with open(array.with_suffix(".lock"), "a", opener=not_through_symlinks) as lock:  # "a": never truncate it
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, also when the process dies
        record, damage = _checked(array, manifest)  # another process may have built it while this one waited
        if record is None:
            if damage:
                print(f"cache entry {array} is damaged ({damage}); building it again", flush=True)
            # Temporary files of a build that was killed (kill -9 leaves them): only the lock holder builds this entry.
            for stale in [*array.parent.glob(f".{array.name}.*"), *array.parent.glob(f".{manifest.name}.*")]:
                stale.unlink(missing_ok=True)
            record = _build(array, manifest, build)
    return record


def _checked(array: Path, manifest: Path) -> tuple[dict | None, str]:
    """The entry's record, or None and what is wrong with it ("" when there is no entry)."""
    try:
        sealed = json.loads(manifest.read_bytes())
        entry = sealed["entry"]
        if zlib.crc32(json.dumps(entry).encode()) != sealed["crc32"]:
            return None, f"{manifest.name} does not match its checksum"
        record, size, sums = entry["record"], entry["bytes"], entry["chunk_crc32"]
    except FileNotFoundError:
        return None, ""
    except (ValueError, KeyError, TypeError):  # truncated or garbled
        return None, f"{manifest.name} is unreadable"
    found = array.stat().st_size if array.is_file() else 0
    if found != size:
        return None, f"{array.name} holds {found} bytes, its manifest says {size}"
    every = os.environ.get("LAUNCHKIT_VERIFY_CACHE") == "1" or len(sums) <= SAMPLED_CHUNKS
    with open(array, "rb") as f:
        for i in range(len(sums)) if every else np.linspace(0, len(sums) - 1, SAMPLED_CHUNKS).round().astype(int):
            f.seek(i * CHUNK)
            if zlib.crc32(f.read(CHUNK)) != sums[i]:
                return None, f"{array.name} changed after it was written: its MiB {i} of {len(sums)} fails its CRC-32"
    return record, ""


def _build(array: Path, manifest: Path, build) -> dict:
    def fill(out):
        summed = _Summed(out)
        return {"record": build(summed.write), "bytes": summed.size, "chunk_crc32": summed.sums}

    # The array first, then its manifest: a reader never sees an entry whose array is missing or half written.
    body = json.dumps(_written(array, fill))
    sealed = json.dumps({"crc32": zlib.crc32(body.encode()), "entry": json.loads(body)})
    _written(manifest, lambda out: out.write(sealed.encode()))
    return json.loads(body)["record"]  # as a reader sees it: JSON's string keys and lists


class _Summed:
    """A file writer that keeps the CRC-32 of every CHUNK bytes written."""

    def __init__(self, out):
        self.out, self.size, self.sums = out, 0, []

    def write(self, data: bytes):
        self.out.write(data)
        view = memoryview(data).cast("B")
        while view:
            if self.size % CHUNK == 0:
                self.sums.append(0)
            part, view = view[: CHUNK - self.size % CHUNK], view[CHUNK - self.size % CHUNK :]
            self.sums[-1] = zlib.crc32(part, self.sums[-1])
            self.size += len(part)


def _written(path: Path, fill: Callable):
    """fill(file)'s result, having filled a new file under an unpredictable name beside path and renamed it to path:
    never seen half written, and in a folder others can write a planted file or symlink is never written through."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    out = open(tmp, "xb", opener=not_through_symlinks)  # "x": O_EXCL, fails rather than open what is there
    try:
        with out:
            result = fill(out)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # interrupted or failed: no half-written file left behind
        raise
    return result


def not_through_symlinks(path, flags):
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)  # 0o666 less the umask, as open() creates files


def decoded_in_order(job: torch.utils.data.Dataset, workers: int, desc: str) -> Iterator:
    """job's items in index order (no shuffling, and the DataLoader keeps its workers' order), with a progress bar."""
    # Its own generator: the global RNG, which seeds the weights, stays untouched.
    loader = torch.utils.data.DataLoader(job, batch_size=16, num_workers=workers, collate_fn=list, generator=torch.Generator())
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        yield from batch


def file_stamp(path) -> bytes:
    """A source file as a cache key sees it: the file system's bytes of its absolute path (any name, also one that is
    not valid UTF-8), its size and its modification time."""
    st = os.stat(path)
    return os.fsencode(os.path.abspath(path)) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode()


class MappedArray:
    """An array file as a numpy memory map, opened on first use: pickled into DataLoader workers without the map,
    each worker maps the file itself."""

    def __init__(self, path: Path, dtype, mode: str = "r"):
        self.path, self.dtype, self.mode, self._map = path, dtype, mode, None

    def __getitem__(self, where):
        if self._map is None:
            self._map = np.memmap(self.path, dtype=self.dtype, mode=self.mode)
        return self._map[where]

    def __getstate__(self):
        return {**self.__dict__, "_map": None}


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "launchkit"
