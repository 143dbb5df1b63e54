"""Evaluation protocols and training windows: --fold all cross-validation with gather_folds.py, the 12-class
Speech Commands task, random crops of long training clips and time shift."""

import json
import os
import shutil
import signal

import audio_augment
import make_demo_audio
import numpy as np
import pytest
import soundfile as sf
import torch
import train_audio
from audio_data import SILENCE, UNKNOWN, CachedClips, Clip, DataError, KeywordTask, Split, load_audio_data, read_audio
from conftest import run_script

RATE = 8000
TINY_RUN = [
    "--epochs", 1, "--batch-size", 4, "--nominal-batch-size", 4, "--clip-seconds", 0.5, "--mixed-precision", "no",
    "--sample-rate", RATE, "--n-mels", 32, "--workers", 0,
]  # fmt: skip
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- --fold all and gather_folds.py


@pytest.fixture(scope="module")
def cross_validation(tmp_path_factory):
    """Three folds of two classes, two clips of each class per fold: every fold run trains on four clips."""
    work = tmp_path_factory.mktemp("cv")
    root = work / "UrbanSound8K"
    make_demo_audio.main(
        ["--layout", "urbansound8k", "--output", str(root), "--folds", "3", "--classes", "2", "--clips-per-class", "6",
         "--seconds", "0.5"]
    )  # fmt: skip
    out = work / "runs"
    proc = run_script(
        "train_audio.py", "--data", root, "--output-dir", out, "--fold", "all", "--cache-dir", work / "cache", *TINY_RUN,
        env=ONE_THREAD,
    )  # fmt: skip
    return root, out, proc


def test_fold_all_trains_every_fold_into_its_own_run_and_summarises_them(cross_validation):
    root, out, proc = cross_validation
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [1, 2, 3] and summary["missing"] == {}
    for k in (1, 2, 3):
        run = out / f"fold_{k}"
        assert all((run / name).is_file() for name in ("metrics.json", "args.json", "model/model.safetensors", "results.csv"))
        args = json.loads((run / "args.json").read_text())
        assert args["fold"] == k and args["output_dir"] == str(run)
        test = json.loads((run / "metrics.json").read_text())["test"]
        assert sum(c["support"] for c in test["per_class"].values()) == len(_test_clip_paths(root, k)) == 4
    for metric in ("accuracy", "macro_f1"):
        per_fold = [json.loads((out / f"fold_{k}" / "metrics.json").read_text())["test"][metric] for k in (1, 2, 3)]
        assert [f[metric] for f in summary["folds"]] == per_fold
        assert summary["mean"][metric] == pytest.approx(np.mean(per_fold))
        assert summary["std"][metric] == pytest.approx(np.std(per_fold, ddof=1))
    assert "sample" in summary["std_kind"] and "3 folds: test accuracy" in proc.stdout


def _test_clip_paths(root, fold):
    return load_audio_data(str(root), fold=fold).splits["test"].names


def test_gather_folds_writes_the_same_summary_and_names_a_missing_fold(cross_validation, tmp_path):
    _, out, _ = cross_validation
    written = json.loads((out / "cv_metrics.json").read_text())
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    run_script("gather_folds.py", copy)
    assert json.loads((copy / "cv_metrics.json").read_text()) == written

    shutil.rmtree(copy / "fold_2")
    (copy / "fold_3" / "metrics.json").unlink()
    refused = run_script("gather_folds.py", copy, check=False)
    assert refused.returncode != 0
    assert "2 of 3 folds have no finished run" in refused.stderr
    assert "fold_2: missing" in refused.stderr and "fold_3: unfinished" in refused.stderr
    run_script("gather_folds.py", copy, "--allow-missing")
    partial = json.loads((copy / "cv_metrics.json").read_text())
    assert [f["fold"] for f in partial["folds"]] == [1] and set(partial["missing"]) == {"fold_2", "fold_3"}
    assert partial["std"]["accuracy"] is None


def test_fold_all_resume_keeps_finished_folds_and_continues_the_others(cross_validation, tmp_path):
    root, out, _ = cross_validation
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    (copy / "fold_2" / "metrics.json").unlink()  # fold 2 stopped after its last checkpoint, before testing
    (copy / "cv_metrics.json").unlink()
    proc = run_script(
        "train_audio.py", "--data", root, "--output-dir", copy, "--fold", "all", "--resume", "--cache-dir",
        root.parent / "cache", *TINY_RUN, env=ONE_THREAD,
    )  # fmt: skip
    assert "fold 1: finished earlier, kept" in proc.stdout and "fold 3: finished earlier, kept" in proc.stdout
    assert f"resumed from {copy / 'fold_2' / 'checkpoints'}" in proc.stdout
    assert json.loads((copy / "cv_metrics.json").read_text()) == json.loads((out / "cv_metrics.json").read_text())


def test_a_sigterm_while_a_fold_is_tested_stops_the_next_fold_with_a_checkpoint(cross_validation, tmp_path, monkeypatch, capsys):
    root, _, _ = cross_validation
    tested = train_audio.finish

    def finish_then_sigterm(*args, **kwargs):
        tested(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # preemption after fold 1's training loop ended

    monkeypatch.setattr(train_audio, "finish", finish_then_sigterm)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out = tmp_path / "cv"
    try:
        train_audio.main(
            ["--data", str(root), "--output-dir", str(out), "--fold", "all", "--cache-dir", str(root.parent / "cache"),
             *map(str, TINY_RUN)]
        )  # fmt: skip
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    printed = capsys.readouterr().out
    assert (out / "fold_1" / "metrics.json").is_file()
    assert not (out / "fold_2" / "metrics.json").exists() and list((out / "fold_2" / "checkpoints").iterdir())
    assert "stopped at epoch 1, optimizer step 1; checkpoint saved" in printed
    assert not (out / "fold_3").exists() and not (out / "cv_metrics.json").exists()


def test_fold_all_on_a_layout_without_folds_stops_with_the_reason(tmp_path):
    root = tmp_path / "sc"
    make_demo_audio.main(["--output", str(root), "--classes", "2", "--clips-per-class", "4", "--seconds", "0.2"])
    with pytest.raises(SystemExit, match=r"--fold all .* only UrbanSound8K and ESC-50 have; .* speech_commands layout"):
        train_audio.main(["--data", str(root), "--output-dir", str(tmp_path / "run"), "--fold", "all"])


# ----------------------------------------------------------------------------- the 12-class Speech Commands task

WANTED, OTHERS = ("yes", "no"), ("up", "down", "left")


@pytest.fixture
def commands(tmp_path):
    """Ten 0.2 s clips of each of five words (speaker 0 in validation, speaker 1 in test) and two noise files."""
    root = tmp_path / "speech_commands"
    rng = np.random.default_rng(0)
    for word in WANTED + OTHERS:
        (root / word).mkdir(parents=True)
        for i in range(10):
            sf.write(root / word / f"spk{i}_nohash_0.wav", rng.uniform(-0.5, 0.5, RATE // 5), RATE)
    words = WANTED + OTHERS
    (root / "validation_list.txt").write_text("".join(f"{w}/spk0_nohash_0.wav\n" for w in words))
    (root / "testing_list.txt").write_text("".join(f"{w}/spk1_nohash_0.wav\n" for w in words))
    (root / "_background_noise_").mkdir()
    for name, seconds in (("white.wav", 3), ("pink.wav", 2.5)):
        sf.write(root / "_background_noise_" / name, rng.uniform(-0.3, 0.3, int(seconds * RATE)), RATE)
    return root


def test_keyword_task_classes_splits_and_counts(commands):
    task = KeywordTask(WANTED, unknown_percentage=50, silence_percentage=25)
    data = load_audio_data(str(commands), keywords=task)
    assert data.labels == ["yes", "no", UNKNOWN, SILENCE]
    assert data.protocol == {"words": ["yes", "no"], "unknown_percentage": 50, "silence_percentage": 25}
    names = {split: set(s.names) for split, s in data.splits.items()}
    assert not names["train"] & (names["val"] | names["test"]) and not names["val"] & names["test"]
    for split, wanted, speaker in (("train", 16, None), ("val", 2, "spk0"), ("test", 2, "spk1")):
        s = data.splits[split]
        counts = np.bincount(s.targets, minlength=4)
        assert counts.tolist() == [wanted // 2, wanted // 2, int(np.ceil(wanted * 0.5)), int(np.ceil(wanted * 0.25))]
        unknown = [n for n, t in zip(s.names, s.targets, strict=True) if t == 2]
        assert all(n.split("/")[-2] in OTHERS for n in unknown)
        if speaker:  # held-out unknown clips come from the held-out lists, like the wanted ones
            assert all(n.endswith(f"{speaker}_nohash_0.wav") for n, t in zip(s.names, s.targets, strict=True) if t < 3)
    again = load_audio_data(str(commands), keywords=task)
    assert all(again.splits[k].names == data.splits[k].names for k in data.splits)  # fixed seeds


def test_silence_clips_are_slices_of_the_noise_and_decode_as_such(commands, tmp_path):
    data = load_audio_data(str(commands), keywords=KeywordTask(WANTED, silence_percentage=50))
    silence = [c for s in data.splits.values() for c, t in zip(s.sources, s.targets, strict=True) if t == 3]
    assert len(silence) == 8 + 1 + 1 and len({(c.path, c.start) for c in silence}) > 1
    for clip in silence:
        assert isinstance(clip, Clip) and clip.path.startswith(str(commands / "_background_noise_"))
        assert clip.frames == RATE and 0 <= clip.start and clip.start + clip.frames <= sf.info(clip.path).frames
    clip = silence[0]
    decoded = CachedClips(Split([clip], np.zeros(1, dtype=np.int64), [str(clip)]), RATE, RATE, tmp_path / "cache")[0][0]
    expected, _ = sf.read(clip.path, start=clip.start, stop=clip.start + clip.frames, dtype="float32")
    assert np.abs(decoded.numpy() / 32768 - expected).max() < 1e-4
    assert torch.equal(read_audio(clip, RATE), torch.from_numpy(expected))


def test_export_checks_a_keyword_run_on_its_own_val_split(commands, tmp_path):
    """export_model.py's parity inputs (audio_predictor.val_clips of the run's args.json) are the run's val split as
    the run saw it: with --wanted-words, the words' clips plus _unknown_ and _silence_ (a window of the noise, decoded
    as such), not every word of the folder."""
    from audio_predictor import val_clips

    run = {"data": str(commands), "format": None, "clip_seconds": 1.0}
    (tmp_path / "args.json").write_text(json.dumps(run | {"wanted_words": list(WANTED), "unknown_percentage": 100,
                                                          "silence_percentage": 50}))  # fmt: skip
    clips = dict(val_clips(json.loads((tmp_path / "args.json").read_text()), RATE, RATE, None))
    expected = load_audio_data(str(commands), keywords=KeywordTask(WANTED, 100, 50)).splits["val"]
    assert list(clips) == expected.names and any(SILENCE in name or "_background_noise_" in name for name in clips)
    silence = next(c for c, t in zip(expected.sources, expected.targets, strict=True) if t == 3)
    assert torch.equal(clips[expected.names[expected.sources.index(silence)]], read_audio(silence, RATE, RATE))
    (tmp_path / "args.json").write_text(json.dumps(run))  # the same folder without the task: every word
    assert len(val_clips(run, RATE, RATE, None)) == len(WANTED + OTHERS)


def test_keyword_task_without_silence_or_with_a_missing_word(commands):
    data = load_audio_data(str(commands), keywords=KeywordTask(WANTED, silence_percentage=0))
    assert data.labels == ["yes", "no", UNKNOWN]
    plain = load_audio_data(str(commands))
    assert plain.labels == sorted(WANTED + OTHERS) and plain.protocol is None  # without the task, every word is a class
    with pytest.raises(DataError, match=r"no word folder for \['maybe'\] .* word folders are \['down', 'left', 'no', 'up'"):
        load_audio_data(str(commands), keywords=KeywordTask(("yes", "maybe")))


# ----------------------------------------------------------------------------- random crops and time shift


def ramp(path, seconds, low=0.1, high=0.9):
    """A clip whose every sample differs from the others (a rising ramp), so a window's start is its first value."""
    sf.write(path, np.linspace(low, high, int(seconds * RATE)), RATE, subtype="FLOAT")
    return str(path)


def test_training_clips_are_cropped_at_random_places_and_evaluation_clips_at_their_start(tmp_path):
    paths = [ramp(tmp_path / "long.wav", 3), ramp(tmp_path / "medium.wav", 1.5)]
    split = Split(paths, np.zeros(2, dtype=np.int64), paths)
    train = CachedClips(split, RATE, RATE, tmp_path / "cache", span=3 * RATE)
    assert [train[i][2] for i in range(2)] == [3 * RATE, int(1.5 * RATE)] and train[1][0].shape == (3 * RATE,)
    waves, lengths = torch.stack([train[i][0] for i in range(2)]).float(), torch.tensor([train[i][2] for i in range(2)])
    starts = [set(), set()]
    torch.manual_seed(0)
    for _ in range(20):  # twenty epochs' draws
        windows = audio_augment.random_windows(waves, lengths, RATE)
        for i in range(2):
            start = int(torch.nonzero(waves[i] == windows[i, 0])[0])
            assert torch.equal(windows[i], waves[i, start : start + RATE]) and start + RATE <= lengths[i]
            starts[i].add(start)
    assert len(starts[0]) > 10 and len(starts[1]) > 10 and max(starts[0]) > 1.5 * RATE

    evaluation = CachedClips(split, RATE, RATE, tmp_path / "cache")
    assert evaluation[0][0].shape == (RATE,) and torch.equal(evaluation[0][0], train[0][0][:RATE])
    args = train_audio.parse_args(["--data", "x", "--output-dir", "y", "--no-augment"])
    assert torch.equal(audio_augment.augment_waveforms(waves, lengths, RATE, torch.zeros(0), args), waves[:, :RATE])


def test_time_shift_moves_the_content_and_fills_with_zeros():
    wave = torch.linspace(0.1, 0.9, RATE).repeat(16, 1)
    torch.manual_seed(1)
    shifted = audio_augment.time_shift(wave, 0.1)
    seen = set()
    for row in shifted:
        zeros = int((row == 0).sum())
        assert zeros <= RATE // 10
        if row[0] == 0:  # delayed: silence first, then the clip's start
            assert torch.equal(row[zeros:], wave[0, : RATE - zeros])
            seen.add(zeros)
        else:  # advanced: the clip from a later sample, silence at the end
            assert torch.equal(row[: RATE - zeros], wave[0, zeros:]) and (row[RATE - zeros :] == 0).all()
            seen.add(-zeros)
    assert len(seen) > 8 and any(s > 0 for s in seen) and any(s < 0 for s in seen)
    assert torch.equal(audio_augment.time_shift(wave, 0), wave)


def test_speed_perturbation_scales_pitch_and_tempo_together():
    """A ramp says where each output sample was read from (tempo); a tone's spectral peak says its pitch: both scale by
    the same random speed per clip, within 1 +- the amount."""
    t = torch.arange(RATE, dtype=torch.float64)
    ramp, tone = ((t + 1) / RATE).repeat(32, 1), torch.sin(2 * torch.pi * 500 * t / RATE).repeat(32, 1)
    torch.manual_seed(2)
    read_at = audio_augment.speed_perturb(ramp, 0.2)
    torch.manual_seed(2)
    pitched = audio_augment.speed_perturb(tone, 0.2)
    speeds = (read_at[:, 101] - read_at[:, 100]) * RATE
    assert ((speeds > 0.8 - 1e-9) & (speeds < 1.2 + 1e-9)).all() and speeds.std() > 0.05  # drawn per clip
    for row, speed, tone_row in zip(read_at, speeds, pitched, strict=True):
        playing = row > 0
        torch.testing.assert_close(row[playing], (t[playing] * speed + 1) / RATE, atol=1e-5, rtol=0)  # input at t x speed
        assert playing.sum() == min(RATE, int((RATE - 1) / speed) + 1) and not playing[playing.sum() :].any()  # then silence
        peak = torch.fft.rfft(tone_row[playing]).abs().argmax() * RATE / playing.sum()
        assert abs(peak / 500 - speed) < 0.01, (peak, speed)
    assert torch.equal(audio_augment.speed_perturb(tone, 0), tone)
