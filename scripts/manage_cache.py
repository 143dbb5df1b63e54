#!/usr/bin/env python
"""Show what the decode caches hold, and prune them to a size, least recently used first.

    python scripts/manage_cache.py list                      # every entry: task, size, last used, key
    python scripts/manage_cache.py prune --max-size 20G      # delete the least recently used entries down to 20 GB
    python scripts/manage_cache.py prune --max-size 0 --dry-run

The training scripts decode clips and images once into CACHE/audio and CACHE/detection (CACHE: ~/.cache/launchkit,
or $XDG_CACHE_HOME/launchkit; --cache-dir moves it, and --cache-dir here follows). An entry is an array file and its
manifest; a run marks an entry used when it opens it. An entry being built (its lock held) is never deleted; a run
that has an entry mapped keeps reading it after a prune (Linux frees the space when the run closes it), and the next
run builds it again.
"""

import argparse
import fcntl
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

from shared.cache import cache_root, not_through_symlinks

UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def size_in_bytes(text: str) -> int:
    number, unit = text.upper().removesuffix("B"), ""
    if number and number[-1] in UNITS:
        number, unit = number[:-1], number[-1]
    try:
        return int(float(number) * UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 500M, 20G or 0") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=cache_root(), help="the caches' folder (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every entry, least recently used first, and the total")
    prune = commands.add_parser("prune", help="delete the least recently used entries until the caches fit --max-size")
    prune.add_argument("--max-size", type=size_in_bytes, required=True, help="e.g. 500M, 20G; 0 deletes every idle entry")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    return parser.parse_args(argv)


def entries(root: Path) -> list[dict]:
    """Each complete entry (a manifest and its array), least recently used first. Searched two levels deep: the
    tasks' folders under the default root, or a --cache-dir that a run was given directly."""
    found = []
    for manifest in [*root.glob("*.json"), *root.glob("*/*.json")]:
        arrays = [p for p in manifest.parent.glob(manifest.stem + ".*") if p.suffix not in (".json", ".lock")]
        if len(arrays) == 1 and not manifest.name.startswith("."):
            array = arrays[0]
            size = array.stat().st_size + manifest.stat().st_size
            found.append({"manifest": manifest, "array": array, "bytes": size, "used": manifest.stat().st_mtime})
    return sorted(found, key=lambda e: e["used"])


def shown(entry: dict, root: Path) -> str:
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["used"]))
    return f"{entry['bytes'] / 1e6:10.1f} MB  {used}  {entry['array'].relative_to(root)}"


def delete_unless_building(entry: dict) -> bool:
    """Deleted under the entry's build lock, manifest first: a run that looks meanwhile sees no entry, not half of one."""
    lock = entry["manifest"].with_suffix(".lock")
    with open(lock, "a", opener=not_through_symlinks) as handle:  # as a build opens it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        entry["manifest"].unlink(missing_ok=True)
        entry["array"].unlink(missing_ok=True)
    return True


def main(argv=None):
    args = parse_args(argv)
    found = entries(args.cache_dir)
    total = sum(e["bytes"] for e in found)
    if args.command == "list":
        for entry in found:
            print(shown(entry, args.cache_dir))
        print(f"{len(found)} entries, {total / 1e9:.2f} GB in {args.cache_dir}")
        return
    deleted, busy = 0, 0
    for entry in found:
        if total <= args.max_size:
            break
        if args.dry_run or delete_unless_building(entry):
            print(("would delete " if args.dry_run else "deleted ") + shown(entry, args.cache_dir))
            total -= entry["bytes"]
            deleted += 1
        else:
            busy += 1
    note = f"; {busy} being built, kept" if busy else ""
    print(
        f"{'would delete' if args.dry_run else 'deleted'} {deleted} entries{note}; {total / 1e9:.2f} GB left in {args.cache_dir}"
    )


if __name__ == "__main__":
    main()
