"""Bad input on the audio side: list and metadata files, odd file names, loud float files, broken splits, a cache
built by many processes at once, a --data path that does not exist, and predict_audio.py's output file."""

import csv
import json
import math
import multiprocessing
import os
import re
import struct
import time

import audio_data
import numpy as np
import predict_audio
import pytest
import soundfile as sf
import torch
from audio_data import CachedClips, DataError, Split, detect_format, load_audio_data, read_audio, require_usable_splits
from test_audio_data import make_speech_commands, make_us8k, tone

import shared.cache

RATE = 8000


def split_of(paths) -> Split:
    paths = [str(p) for p in paths]
    return Split(paths, np.zeros(len(paths), dtype=np.int64), paths)


# ----------------------------------------------------------------------------- Speech Commands list files


def test_list_entries_written_by_other_tools_still_hold_their_clips_out_of_training(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    (root / "validation_list.txt").write_bytes(b"./no/spk0_nohash_0.wav  \r\nyes\\spk0_nohash_0.wav\r\n\r\n")
    (root / "testing_list.txt").write_text("./no/spk1_nohash_0.wav\t\n")
    data = load_audio_data(str(root))
    held_out = {"no/spk0_nohash_0.wav", "yes/spk0_nohash_0.wav", "no/spk1_nohash_0.wav"}
    rel = {name: {p.split("sc/")[1] for p in s.names} for name, s in data.splits.items()}
    assert rel["val"] == {"no/spk0_nohash_0.wav", "yes/spk0_nohash_0.wav"} and rel["test"] == {"no/spk1_nohash_0.wav"}
    assert not rel["train"] & held_out and len(rel["train"]) == 7


def test_list_entry_in_a_class_folder_that_does_not_exist_or_outside_the_classes(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    (root / "testing_list.txt").write_text("no/spk1_nohash_0.wav\nmaybe/spk1_nohash_0.wav\n")
    with pytest.raises(
        DataError, match=r"testing_list.txt lists maybe/spk1_nohash_0.wav, .*: there is no class folder maybe/ \(line 2\)"
    ):
        load_audio_data(str(root))
    (root / "testing_list.txt").write_text("_background_noise_/noise.wav\n")
    with pytest.raises(DataError, match=r"lists _background_noise_/noise.wav, which is not an audio clip in a class folder"):
        load_audio_data(str(root))


def test_list_entry_without_file_names_its_line(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    (root / "validation_list.txt").write_text("no/spk0_nohash_0.wav\n\nyes/ghost.wav\n")
    with pytest.raises(DataError, match=r"validation_list.txt lists yes/ghost.wav, which does not exist .*\(line 3\)"):
        load_audio_data(str(root))


def test_list_file_that_names_no_clip(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    (root / "testing_list.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"testing_list.txt names no clips"):
        load_audio_data(str(root))


def test_list_file_that_is_not_utf8(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    (root / "testing_list.txt").write_bytes(b"no/spk1_nohash_0.wav\nno/caf\xe9.wav\n")
    with pytest.raises(DataError, match=r"testing_list.txt line 2: byte 0xe9 is not UTF-8"):
        load_audio_data(str(root))


# ----------------------------------------------------------------------------- UrbanSound8K / ESC-50 metadata


def edit_us8k_csv(root, edit):
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = list(csv.reader(meta.open()))
    edit(rows)
    with meta.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return meta


def test_fold_that_is_not_a_number(tmp_path):
    root = make_us8k(tmp_path / "us8k")
    edit_us8k_csv(root, lambda rows: rows[3].__setitem__(5, "fold1"))
    with pytest.raises(DataError, match=r"UrbanSound8K.csv line 4: fold 'fold1' is not a whole number"):
        load_audio_data(str(root))


def test_class_ids_and_names_that_disagree(tmp_path):
    root = make_us8k(tmp_path / "us8k")

    def conflict(rows):
        rows[1][6] = "1"  # dog_bark with the id of siren
        rows[4][7] = "Siren"  # id 1 with a second name

    edit_us8k_csv(root, conflict)
    with pytest.raises(
        DataError, match=r"classID and class disagree: classID 0 = 'dog_bark', classID 1 = 'Siren', classID 1 = 'dog_bark'"
    ):
        load_audio_data(str(root))


@pytest.mark.parametrize(
    "content, message",
    [(None, r"UrbanSound8K.csv does not exist"), (b"", r"UrbanSound8K.csv is empty"), (b"x", r"missing column")],
)
def test_metadata_csv_missing_or_empty(tmp_path, content, message):
    root = make_us8k(tmp_path / "us8k")
    meta = root / "metadata" / "UrbanSound8K.csv"
    header = meta.read_text().splitlines()[0]
    meta.unlink()
    if content is not None:
        meta.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_audio_data(str(root), "urbansound8k")
    meta.write_text(header + "\n")
    with pytest.raises(DataError, match=r"UrbanSound8K.csv has a header but no rows"):
        load_audio_data(str(root), "urbansound8k")


def test_metadata_csv_that_is_not_utf8(tmp_path):
    root = make_us8k(tmp_path / "us8k")
    meta = root / "metadata" / "UrbanSound8K.csv"
    meta.write_bytes(meta.read_bytes().replace(b"siren", b"sir\xe8ne"))
    with pytest.raises(DataError, match=r"UrbanSound8K.csv line \d+: byte 0xe8 is not UTF-8; save the file as UTF-8"):
        load_audio_data(str(root))


# ----------------------------------------------------------------------------- file names, bounded reads, loud floats


def test_non_ascii_and_undecodable_file_names_decode_and_cache(tmp_path):
    paths = [tmp_path / "café_ñ.wav", tmp_path / os.fsdecode(b"bad\xff\xfename.wav")]  # the second is not UTF-8
    for path in paths:
        try:
            os.rename(tone(tmp_path / "plain.wav"), path)
        except (OSError, UnicodeEncodeError):
            pytest.skip(f"this file system does not take the name {path.name!r}")
    split = split_of(paths)
    clips = CachedClips(split, RATE, 1000, tmp_path / "cache")
    assert len(clips) == 2 and clips.skipped == []
    assert all(clips[i][0].abs().max() > 10000 for i in range(2))
    assert audio_data._cache_key(split, RATE, 1000) != audio_data._cache_key(split_of(paths[:1]), RATE, 1000)


def test_a_short_clip_of_a_long_file_reads_only_its_frames(tmp_path, monkeypatch):
    long = tmp_path / "long.wav"
    sf.write(long, np.random.default_rng(0).uniform(-0.5, 0.5, 60 * RATE), RATE)  # one minute
    read_frames, original = [], sf.SoundFile.read

    def counting_read(self, *args, **kwargs):
        data = original(self, *args, **kwargs)
        read_frames.append(len(data))
        return data

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    clips = CachedClips(split_of([long]), RATE, RATE, tmp_path / "cache")
    assert read_frames and max(read_frames) <= RATE + RATE // 100  # one second and a 10 ms margin, not sixty
    assert np.array_equal(clips[0][0].numpy(), audio_data.to_pcm16(read_audio(long, RATE)[:RATE]))


def test_a_float_file_beyond_full_scale_reaches_the_model_alike_in_training_and_prediction(tmp_path, monkeypatch):
    rate = 22050  # not the model's rate: resampling is part of both paths
    t = np.arange(int(1.5 * rate)) / rate
    path = tmp_path / "loud.wav"
    sf.write(
        path, np.stack([2.0 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1), rate, subtype="FLOAT"
    )
    trained_on = CachedClips(split_of([path]), 16000, 16000, tmp_path / "cache")[0][0].float() / 32768

    config = {"sample_rate": 16000, "labels": ["a", "b"], "clip_seconds": 1.0}
    model_inputs = []
    monkeypatch.setattr(predict_audio, "load_model", lambda *a: (None, config))
    monkeypatch.setattr(predict_audio, "predict", lambda m, x, b: model_inputs.append(x) or torch.full((len(x), 2), 0.5))
    predict_audio.main([str(path), "--model-dir", str(tmp_path), "--output", str(tmp_path / "p.jsonl"), "--cpu"])
    predicted_on = model_inputs[0][0]
    assert predicted_on.abs().max() == pytest.approx(1.0) and trained_on.abs().max() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(trained_on, predicted_on, atol=2 / 32768)


# ----------------------------------------------------------------------------- header fields that size the work


@pytest.mark.parametrize("rate", [999, 768000])
def test_a_sample_rate_outside_1_to_384_khz_is_refused_and_training_skips_the_clip(tmp_path, rate):
    odd = tone(tmp_path / "odd.wav", seconds=0.01, rate=rate)
    reason = f"sample rate {rate} Hz outside 1000-384000 Hz; a broken header, or resample the file"
    with pytest.raises(audio_data.BadClip, match=reason):
        read_audio(odd, RATE)
    clips = CachedClips(split_of([tone(tmp_path / "good.wav"), odd]), RATE, 1000, tmp_path / "cache")
    assert len(clips) == 1 and clips.skipped == [{"path": str(odd), "reason": reason}]


@pytest.mark.parametrize("rate", [16001, 44101, 383999])
def test_an_odd_rate_inside_the_range_resamples_with_a_small_kernel(tmp_path, monkeypatch, rate):
    resample = audio_data.AF.resample

    def bounded(wave, orig, new):
        # torchaudio's kernel holds about orig x new taps in lowest terms: 16001 x 16000 took 5 GB and 30 s
        assert orig * new // math.gcd(orig, new) ** 2 < 10**7, (orig, new)
        return resample(wave, orig, new)

    monkeypatch.setattr(audio_data.AF, "resample", bounded)
    started = time.perf_counter()
    wave = read_audio(tone(tmp_path / "odd.wav", seconds=0.5, rate=rate), 16000)
    assert time.perf_counter() - started < 2
    assert abs(wave.numel() - 8000) <= 2 and float(wave.pow(2).mean().sqrt()) == pytest.approx(0.5 / 2**0.5, rel=0.01)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_usual_rates_resample_exactly_as_torchaudio_does(tmp_path, rate):
    path = tone(tmp_path / "a.wav", seconds=0.3, rate=rate, channels=2)
    mono = torch.from_numpy(sf.read(path, dtype="float32")[0].mean(axis=1))
    assert torch.equal(read_audio(path, 16000), audio_data.AF.resample(mono, rate, 16000))


def test_many_channels_are_downmixed_a_block_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "array.wav"  # 64 channels: 5 MB as float32, though a compressed file of them can be tiny
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, (20000, 64)), RATE, subtype="PCM_16")
    expected = torch.from_numpy(sf.read(path, dtype="float32")[0].mean(axis=1))
    reads, original = [], sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: reads.append(original(self, *a, **k)) or reads[-1])
    assert torch.equal(read_audio(path, RATE), expected) and max(r.nbytes for r in reads) <= 4 << 20

    header = bytearray(tone(tmp_path / "a.wav").read_bytes())
    struct.pack_into("<H", header, 22, 5000)  # a header claiming 5000 channels
    (tmp_path / "b.wav").write_bytes(header)
    with pytest.raises(audio_data.BadClip, match="unreadable: .*[Tt]oo many channels"):
        read_audio(tmp_path / "b.wav", RATE)
    sf.write(tmp_path / "c.wav", np.zeros((100, 65)), RATE, subtype="PCM_16")  # one more than is decoded
    with pytest.raises(audio_data.BadClip, match="65 channels, more than 64"):
        read_audio(tmp_path / "c.wav", RATE)


# ----------------------------------------------------------------------------- splits left empty by decoding


def test_a_split_whose_clips_are_all_unreadable_stops_before_training(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "text.wav").write_text("not audio")
    clips = {
        "train": CachedClips(split_of([tone(tmp_path / "good.wav")]), RATE, 1000, tmp_path / "cache"),
        "val": CachedClips(split_of([tmp_path / "corrupt.wav", tmp_path / "text.wav"]), RATE, 1000, tmp_path / "cache"),
    }
    report = tmp_path / "run" / "data_report.json"
    with pytest.raises(DataError, match=rf"the val split has no usable clips: all 2 of its clips were skipped .*{report}"):
        require_usable_splits(clips, report)
    require_usable_splits({"train": clips["train"]}, report)


# ----------------------------------------------------------------------------- one cache, many builders


def build_counting_decodes(work, name, barrier):
    """One builder process: logs every clip it decodes, then leaves its copy of the cache's arrays."""
    torch.set_num_threads(1)  # a forked child must not use the thread pool it inherited
    decode = audio_data.read_audio

    def counted(source, *args):
        with open(work / "decoded.log", "a") as log:
            log.write(f"{name} {source}\n")
        time.sleep(0.1)  # a slow decode keeps the two builders overlapping
        return decode(source, *args)

    audio_data.read_audio = counted
    paths = sorted((work / "clips").glob("*.wav"))
    barrier.wait()  # both reach CachedClips together
    clips = CachedClips(split_of(paths), RATE, 1000, work / "cache")
    np.save(work / f"{name}.npy", np.stack([clips[i][0].numpy() for i in range(len(clips))]))


def test_processes_building_one_cache_at_once_decode_each_clip_once(tmp_path):
    for i in range(6):
        tone(tmp_path / "clips" / f"{i}.wav", 300 + 100 * i)
    # Forked, not spawned: torch is already imported here, where a fresh interpreter spends seconds importing it.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    builders = [context.Process(target=build_counting_decodes, args=(tmp_path, n, barrier)) for n in ("a", "b")]
    for b in builders:
        b.start()
    for b in builders:
        b.join(timeout=60)
        b.kill()  # nothing for a builder that exited; a hung one must not outlive the test
    assert [b.exitcode for b in builders] == [0, 0]
    decoded = (tmp_path / "decoded.log").read_text().splitlines()
    assert len(decoded) == 6 and len({line.split()[0] for line in decoded}) == 1  # one builder decoded everything
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_a_complete_cache_is_read_without_the_lock_and_written_under_unpredictable_names(tmp_path, monkeypatch):
    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(os.path.basename(src)) or replace(src, dst))
    split = split_of([tone(tmp_path / "a.wav")])
    CachedClips(split, RATE, 1000, tmp_path / "cache")
    CachedClips(split, RATE, 1000, tmp_path / "cache2")
    assert len(renamed) == 4 and len(set(renamed)) == 4 and all(name.startswith(".") for name in renamed)

    def no_lock(*args):
        raise AssertionError("took the lock although the manifest exists")

    monkeypatch.setattr(shared.cache.fcntl, "flock", no_lock)
    assert len(CachedClips(split, RATE, 1000, tmp_path / "cache")) == 1


# ----------------------------------------------------------------------------- --data


def test_data_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path):
    missing = str(tmp_path / "UrbanSound8k")  # a typo of an existing folder, say
    for call in (lambda: detect_format(missing), lambda: load_audio_data(missing, "folders")):
        started = time.monotonic()
        with pytest.raises(DataError, match=rf"--data {missing}: no such folder; for a Hub dataset add --format hub"):
            call()
        assert time.monotonic() - started < 1  # no network retries
    (tmp_path / "file.wav").write_bytes(b"")
    with pytest.raises(DataError, match=r"file.wav is a file; pass the dataset's folder"):
        load_audio_data(str(tmp_path / "file.wav"))


# ----------------------------------------------------------------------------- predict_audio.py output


@pytest.fixture
def fake_model(monkeypatch):
    """predict_audio.py without a trained network: every window gets the same probabilities."""
    config = {"sample_rate": RATE, "labels": ["a", "b"], "clip_seconds": 0.25}
    monkeypatch.setattr(predict_audio, "load_model", lambda *a: (None, config))
    monkeypatch.setattr(predict_audio, "predict", lambda m, x, b: torch.tensor([[0.25, 0.75]]).repeat(len(x), 1))


def test_files_of_one_name_in_different_folders_are_told_apart(tmp_path, fake_model):
    root = tmp_path / "recordings"
    for folder in ("street", "park"):
        tone(root / folder / "x.wav")
    out = tmp_path / "pred.jsonl"
    predict_audio.main([str(root), "--model-dir", "m", "--output", str(out)])
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [f"{root}/park/x.wav", f"{root}/street/x.wav"]


def test_output_file_is_replaced_whole_and_survives_a_failed_run(tmp_path, fake_model, monkeypatch):
    files = [str(tone(tmp_path / "in" / f"{i}.wav")) for i in range(2)]
    out = tmp_path / "pred.jsonl"
    out.write_text("an earlier run's line\n")
    predict_audio.main([*files, "--model-dir", "m", "--output", str(out)])
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == files  # not appended to

    records = out.read_text()

    record, written = predict_audio.file_record, []

    def interrupted_after_one_file(*args):
        if written:
            raise KeyboardInterrupt  # Ctrl-C half-way through
        written.append(record(*args))
        return written[-1]

    monkeypatch.setattr(predict_audio, "file_record", interrupted_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        predict_audio.main([*files, "--model-dir", "m", "--output", str(out)])
    assert out.read_text() == records  # the interrupted run left the previous output whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "pred.jsonl"]  # and no temporary file


def test_a_file_with_an_odd_rate_is_listed_as_skipped(tmp_path, fake_model, capsys):
    good, odd = tone(tmp_path / "good.wav"), tone(tmp_path / "odd.wav", seconds=0.01, rate=999)
    out = tmp_path / "pred.jsonl"
    with pytest.raises(SystemExit) as stopped:
        predict_audio.main([str(good), str(odd), "--model-dir", "m", "--output", str(out)])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and f"{odd}: sample rate 999 Hz outside 1000-384000 Hz" in err
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [str(good)]
    assert re.search(r"1 of 2 files labelled, 1 skipped, [0-9.]+ s", err), err  # the closing summary
