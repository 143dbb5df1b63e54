"""The decode caches trust nothing they find on disk: a damaged entry (array or manifest) is built again with a
message saying what was wrong, and no file planted in a shared cache folder is ever written through."""

import os
import socket

import audio_data
import numpy as np
import pytest
import torch
from audio_data import CachedClips
from test_audio_data import tone
from test_audio_inputs import split_of
from test_detection_data import noise_image

import shared.cache
from shared.cache import CHUNK, build_once

RATE = 8000


def clips_and_entry(tmp_path):
    split = split_of([tone(tmp_path / f"{i}.wav", 300 + 200 * i) for i in range(3)])
    clips = CachedClips(split, RATE, 1000, tmp_path / "cache")
    key = audio_data._cache_key(split, RATE, 1000)
    return split, [clips[i][0] for i in range(3)], tmp_path / "cache" / f"{key}.pcm"


def reads_back(split, waves, cache_dir):
    again = CachedClips(split, RATE, 1000, cache_dir)
    return all(torch.equal(again[i][0], waves[i]) for i in range(3))


def zeroed(path):
    path.write_bytes(bytes(path.stat().st_size))


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbled(path):  # still valid JSON: one sample length changed
    path.write_text(path.read_text().replace('"lengths": [1000,', '"lengths": [999,'))


@pytest.mark.parametrize(
    "damage,suffix,message",
    [
        (zeroed, ".pcm", "MiB 0 of 1 fails its CRC-32"),
        (truncated, ".pcm", "holds 3000 bytes, its manifest says 6000"),
        (truncated, ".json", "is unreadable"),
        (garbled, ".json", "does not match its checksum"),
    ],
)
def test_a_damaged_clip_cache_is_built_again_and_says_why(tmp_path, capsys, damage, suffix, message):
    split, waves, array = clips_and_entry(tmp_path)
    damage(array.with_suffix(suffix))
    assert reads_back(split, waves, array.parent)
    out = capsys.readouterr().out
    assert f"cache entry {array} is damaged (" in out and message in out
    assert reads_back(split, waves, array.parent) and capsys.readouterr().out == ""  # built once more, then trusted


def test_a_symlink_planted_at_a_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    split = split_of([tone(tmp_path / "a.wav")])
    key = audio_data._cache_key(split, RATE, 1000)
    (tmp_path / "cache").mkdir(mode=0o777)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in (f"{key}.pcm", f"{key}.json"):  # the names this process would have used before
        (tmp_path / "cache" / f".{name}.{socket.gethostname()}.{os.getpid()}").symlink_to(victim)
    assert len(CachedClips(split, RATE, 1000, tmp_path / "cache")) == 1
    assert victim.read_text() == "precious"
    # Even a name guessed right is not written through: the builder, holding the entry's lock, removes what stands at
    # its temporary names (a killed build's leftovers, or a planted link) and creates its own exclusively.
    monkeypatch.setattr(shared.cache.secrets, "token_hex", lambda n: "guessed")
    planted = tmp_path / "other" / ".x.u8.guessed"
    planted.parent.mkdir()
    planted.symlink_to(victim)
    build_once(tmp_path / "other" / "x.u8", lambda write: write(b"attack") or {})
    assert victim.read_text() == "precious" and (tmp_path / "other" / "x.u8").read_bytes() == b"attack"
    assert not planted.is_symlink()


def test_large_entries_are_sampled_on_open_and_checked_in_full_when_asked(tmp_path, monkeypatch, capsys):
    data = np.random.default_rng(0).integers(0, 256, 40 * CHUNK, dtype=np.uint8).tobytes()
    array = tmp_path / "big.u8"
    assert build_once(array, lambda write: write(data[:5]) or write(data[5:]) or {"n": 1}) == {"n": 1}
    with open(array, "r+b") as f:  # MiB 1 is between the sampled chunks 0 and 3
        f.seek(CHUNK + 7)
        f.write(b"\0" * 100)
    built = []
    assert build_once(array, lambda write: built.append(1) or {}) == {"n": 1} and not built  # not sampled: trusted
    monkeypatch.setenv("LAUNCHKIT_VERIFY_CACHE", "1")
    assert build_once(array, lambda write: write(data) or {"n": 2}) == {"n": 2}
    assert "MiB 1 of 40 fails its CRC-32" in capsys.readouterr().out and array.read_bytes() == data
    monkeypatch.delenv("LAUNCHKIT_VERIFY_CACHE")
    zeroed(array)
    assert build_once(array, lambda write: write(data) or {"n": 3}) == {"n": 3}  # every sampled chunk differs


def test_an_interrupted_build_leaves_no_temporary_file(tmp_path):
    def failing(write):
        write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "x.u8", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]


def test_the_image_cache_writes_through_no_planted_symlink_and_is_built_again_when_damaged(tmp_path, capsys):
    from detection_data import ImageCache, Sample, image_cache_key

    samples = []
    for i, size in enumerate([(40, 30), (24, 32)]):
        noise_image(tmp_path / f"{i}.png", size, i)
        samples.append(Sample(i, f"{i}.png", str(tmp_path / f"{i}.png"), *size, np.zeros((0, 4)), np.zeros(0, np.int64)))
    victim, key = tmp_path / "victim", image_cache_key(samples, None, 64)
    victim.write_text("precious")
    (tmp_path / "cache").mkdir()
    for name in (f"{key}.u8", f"{key}.json"):
        (tmp_path / "cache" / f".{name}.{socket.gethostname()}.{os.getpid()}").symlink_to(victim)
    cache = ImageCache(samples, None, 64, tmp_path / "cache")
    images = [cache.image(i).clone() for i in range(2)]
    assert victim.read_text() == "precious"
    zeroed(cache.path)
    again = ImageCache(samples, None, 64, tmp_path / "cache")
    assert all(torch.equal(again.image(i), images[i]) for i in range(2)) and images[0].any()
    assert f"cache entry {cache.path} is damaged" in capsys.readouterr().out
