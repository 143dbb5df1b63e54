"""Audio data layer: every layout parsed from small trees, decoding of the WAV flavours, the cache, bad input."""

import csv
import json

import audio_data
import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from audio_data import BadClip, CachedClips, DataError, detect_format, load_audio_data, read_audio

RATE = 8000


def tone(path, freq=440.0, seconds=0.25, rate=RATE, channels=1, subtype="PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate, subtype=subtype)
    return path


def make_us8k(root, folds=(1, 2, 3), classes=("dog_bark", "siren")):
    rows = []
    for fold in folds:
        for class_id, name in enumerate(classes):
            for k in range(2):  # two slices of one source recording, in one fold
                fname = f"{1000 * fold + class_id}-{class_id}-0-{k}.wav"
                tone(root / "audio" / f"fold{fold}" / fname, 300 + 500 * class_id, rate=44100, channels=2, subtype="PCM_24")
                rows.append([fname, 1000 * fold + class_id, k * 0.5, k * 0.5 + 0.25, 1, fold, class_id, name])
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    with (root / "metadata" / "UrbanSound8K.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerows(rows)
    return root


def make_speech_commands(root, words=("no", "yes"), per_word=5):
    for w in words:
        for i in range(per_word):
            tone(root / w / f"spk{i}_nohash_0.wav")
    (root / "validation_list.txt").write_text(f"{words[0]}/spk0_nohash_0.wav\n{words[1]}/spk0_nohash_0.wav\n")
    (root / "testing_list.txt").write_text(f"{words[0]}/spk1_nohash_0.wav\n")
    tone(root / "_background_noise_" / "noise.wav", seconds=2)
    return root


# ----------------------------------------------------------------------------- layouts


def test_urbansound8k_uses_official_folds(tmp_path):
    root = make_us8k(tmp_path / "us8k")
    assert detect_format(root) == "urbansound8k"
    data = load_audio_data(str(root), fold=2)
    assert data.labels == ["dog_bark", "siren"]  # official classID order
    folds = {name: {int(p.split("/fold")[1].split("/")[0]) for p in s.names} for name, s in data.splits.items()}
    assert folds == {"test": {2}, "val": {1}, "train": {3}}
    assert len(data.splits["test"].sources) == 4
    assert load_audio_data(str(root), fold=1, val_fold=3).notes[0].startswith("test = fold 1, validation = fold 3")


def test_esc50_folds(tmp_path):
    root = tmp_path / "esc"
    rows = []
    for fold in range(1, 6):
        for target, cat in enumerate(["rain", "crow"]):
            name = f"{fold}-{100 + fold}-A-{target}.wav"
            tone(root / "audio" / name, 300 + 400 * target)
            rows.append([name, fold, target, cat, False, 100 + fold, "A"])
    (root / "meta").mkdir()
    with (root / "meta" / "esc50.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["filename", "fold", "target", "category", "esc10", "src_file", "take"], *rows])
    data = load_audio_data(str(root), fold=5)
    assert data.format == "esc50" and data.labels == ["rain", "crow"]
    assert [len(data.splits[s].sources) for s in ("train", "val", "test")] == [6, 2, 2]
    assert all(p.split("/")[-1].startswith("4-") for p in data.splits["val"].names)


def test_speech_commands_lists_and_noise(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    assert detect_format(root) == "speech_commands"
    data = load_audio_data(str(root))
    assert data.labels == ["no", "yes"]  # _background_noise_ is not a class
    assert sorted(p.split("sc/")[1] for p in data.splits["val"].names) == ["no/spk0_nohash_0.wav", "yes/spk0_nohash_0.wav"]
    assert [p.split("sc/")[1] for p in data.splits["test"].names] == ["no/spk1_nohash_0.wav"]
    assert len(data.splits["train"].sources) == 7
    assert len(data.noise_files) == 1


def test_class_folders_plain_and_with_splits(tmp_path):
    plain = tmp_path / "plain"
    for label in ("a", "b"):
        for i in range(10):
            tone(plain / label / f"{i}.wav")
    data = load_audio_data(str(plain))
    assert data.format == "folders"
    sizes = {n: len(s.sources) for n, s in data.splits.items()}
    assert sizes == {"train": 16, "val": 2, "test": 2}
    assert sorted(data.splits["val"].targets.tolist()) == [0, 1]  # stratified
    assert load_audio_data(str(plain)).splits["val"].names == data.splits["val"].names  # fixed seed

    split = tmp_path / "split"
    for part, n in (("train", 4), ("val", 2), ("test", 1)):
        for label in ("a", "b"):
            for i in range(n):
                tone(split / part / label / f"{i}.wav")
    data = load_audio_data(str(split))
    assert {n: len(s.sources) for n, s in data.splits.items()} == {"train": 8, "val": 4, "test": 2}


def test_hub_dataset_saved_to_disk(tmp_path):
    paths = [str(tone(tmp_path / "clips" / f"{i}.wav", 300 + 200 * (i % 2))) for i in range(8)]
    ds = datasets.Dataset.from_dict({"file": paths, "category": ["low", "high"] * 4})
    ds = ds.cast_column("file", datasets.Audio(decode=False))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(tmp_path / "hub")
    data = load_audio_data(str(tmp_path / "hub"), audio_column="file", label_column="category")
    assert data.format == "hub" and data.labels == ["high", "low"]
    assert {n: len(s.sources) for n, s in data.splits.items()} == {"train": 6, "val": 2, "test": 2}
    cache = CachedClips(data.splits["test"], RATE, 1000, tmp_path / "cache")
    wave, label, _ = cache[0]
    assert wave.dtype == torch.int16 and wave.abs().max() > 10000 and label == 1
    with pytest.raises(DataError, match=r"column 'label' does not exist.*--label-column"):
        load_audio_data(str(tmp_path / "hub"), audio_column="file")


# ----------------------------------------------------------------------------- bad input that stops the run


def test_metadata_row_pointing_at_missing_file(tmp_path):
    root = make_us8k(tmp_path / "us8k")
    (root / "audio" / "fold3" / "3001-1-0-1.wav").unlink()
    with pytest.raises(DataError, match=r"UrbanSound8K.csv lists 1 file\(s\) that do not exist, first .*fold3/3001-1-0-1.wav"):
        load_audio_data(str(root))


def test_unknown_fold(tmp_path):
    root = make_us8k(tmp_path / "us8k")
    with pytest.raises(DataError, match=r"--fold 7: .*UrbanSound8K.csv has folds \[1, 2, 3\]"):
        load_audio_data(str(root), fold=7)


def test_empty_class_folder(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    (root / "maybe").mkdir()
    with pytest.raises(DataError, match=r"class folder .*sc/maybe holds no audio files"):
        load_audio_data(str(root))


def test_list_entry_without_file(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    with (root / "testing_list.txt").open("a") as f:
        f.write("yes/ghost_nohash_0.wav\n")
    with pytest.raises(DataError, match=r"testing_list.txt lists yes/ghost_nohash_0.wav, which does not exist"):
        load_audio_data(str(root))


# ----------------------------------------------------------------------------- decoding and cache


@pytest.mark.parametrize(
    "subtype,channels,rate",
    [
        ("PCM_U8", 1, 16000),
        ("PCM_16", 1, 16000),
        ("PCM_24", 2, 44100),
        ("PCM_32", 1, 48000),
        ("FLOAT", 2, 22050),
        ("DOUBLE", 1, 8000),
    ],
)
def test_wav_flavours_decode_to_the_same_tone(tmp_path, subtype, channels, rate):
    path = tone(tmp_path / "x.wav", 1000, seconds=0.5, rate=rate, channels=channels, subtype=subtype)
    wave = read_audio(str(path), 16000)
    assert wave.dtype == torch.float32 and wave.shape == (8000,)
    reference = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 16000)
    middle = slice(500, 7500)  # resampling filters ring at the edges
    assert np.abs(wave.numpy()[middle] - reference[middle]).max() < 0.03


def test_bad_clips_are_skipped_and_listed_and_the_cache_is_reused(tmp_path, monkeypatch):
    good = [str(tone(tmp_path / f"g{i}.wav")) for i in range(3)]
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    sf.write(tmp_path / "empty.wav", np.zeros(0), RATE)
    paths = good[:2] + [str(tmp_path / "corrupt.wav"), str(tmp_path / "empty.wav"), good[2]]
    split = audio_data.Split(paths, np.array([0, 1, 0, 1, 1]), paths)
    clips = CachedClips(split, RATE, 4000, tmp_path / "cache")
    assert len(clips) == 3 and clips.targets.tolist() == [0, 1, 1]
    assert [s["path"] for s in clips.skipped] == paths[2:4]
    assert "unreadable" in clips.skipped[0]["reason"] and "empty" in clips.skipped[1]["reason"]
    wave, _, _ = clips[0]
    assert wave.shape == (4000,) and (wave[2000:] == 0).all() and wave[:2000].abs().max() > 10000  # zero-padded

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache exists")

    monkeypatch.setattr(audio_data, "read_audio", no_decoding)
    again = CachedClips(split, RATE, 4000, tmp_path / "cache")
    assert torch.equal(again[2][0], clips[2][0]) and again.skipped == clips.skipped
    manifest = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert manifest["entry"]["record"]["bad"].keys() == {"2", "3"}
    with pytest.raises(AssertionError, match="decoded again"):  # another length is another cache entry
        CachedClips(split, RATE, 3000, tmp_path / "cache")


def test_unreadable_clip_raises_badclip(tmp_path):
    (tmp_path / "x.wav").write_text("not audio")
    with pytest.raises(BadClip, match="unreadable"):
        read_audio(str(tmp_path / "x.wav"), RATE)
