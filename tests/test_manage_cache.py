"""scripts/manage_cache.py: what the decode caches hold, and pruning them least recently used first."""

import fcntl
import os

import manage_cache
import pytest

from shared.cache import build_once


def entry(folder, name: str, size: int, used: float):
    array = folder / f"{name}.u8"
    build_once(array, lambda write: write(b"x" * size) or {"n": size})
    os.utime(array.with_suffix(".json"), (used, used))
    return array


def test_list_shows_entries_oldest_first_and_prune_deletes_the_least_recently_used(tmp_path, capsys):
    old = entry(tmp_path / "audio", "old", 3_000_000, 1_000)
    new = entry(tmp_path / "detection", "new", 2_000_000, 3_000)
    middle = entry(tmp_path / "audio", "middle", 1_000_000, 2_000)
    manage_cache.main(["--cache-dir", str(tmp_path), "list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in listed[:3]] == ["audio/old.u8", "audio/middle.u8", "detection/new.u8"]
    assert listed[3].startswith("3 entries, 0.01 GB")
    manage_cache.main(["--cache-dir", str(tmp_path), "prune", "--max-size", "2.5M", "--dry-run"])
    assert old.exists() and "would delete 2 entries" in capsys.readouterr().out
    manage_cache.main(["--cache-dir", str(tmp_path), "prune", "--max-size", "2.5M"])
    assert not old.exists() and not old.with_suffix(".json").exists() and not middle.exists() and new.exists()
    assert "deleted 2 entries; 0.00 GB left" in capsys.readouterr().out


def test_an_entry_used_again_is_kept_and_one_being_built_is_never_deleted(tmp_path, capsys):
    first = entry(tmp_path, "first", 1000, 1_000)
    second = entry(tmp_path, "second", 1000, 2_000)
    assert build_once(first, lambda write: pytest.fail("a complete entry is not built again")) == {"n": 1000}
    manage_cache.main(["--cache-dir", str(tmp_path), "prune", "--max-size", "1500"])
    assert first.exists() and not second.exists()  # opening `first` made it the most recently used
    with open(first.with_suffix(".lock"), "a") as lock:  # as a run building the entry holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        manage_cache.main(["--cache-dir", str(tmp_path), "prune", "--max-size", "0"])
    assert first.exists() and "1 being built, kept" in capsys.readouterr().out


def test_sizes_are_read_with_their_units():
    assert [manage_cache.size_in_bytes(s) for s in ("0", "500M", "20G", "1.5gb", "2048")] == [0, 5e8, 2e10, 1.5e9, 2048]
    with pytest.raises(Exception, match="a size such as"):
        manage_cache.size_in_bytes("lots")
