"""--resume knows a run's data by content, not by place: a file replaced under its name, an extra background-noise
file, a changed augmentation or precision are refused; the same data copied elsewhere resumes; and a refused resume
leaves the run folder as it was."""

import os
import shutil

import make_demo_audio
import pytest
from conftest import run_script

FAST = ["--sample-rate", 8000, "--n-mels", 32, "--workers", 0]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def audio_args(data, out, *extra):
    return [
        "--data", data, "--output-dir", out, "--epochs", 1, "--batch-size", 8, "--nominal-batch-size", 8, "--clip-seconds",
        0.5, "--model", "mobilenet_v3_small", "--keep-checkpoints", 1, "--mixed-precision", "no", *FAST, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A finished 1-epoch run on Speech Commands-layout data with two _background_noise_ files."""
    data = tmp_path_factory.mktemp("data") / "sc"
    make_demo_audio.main(["--output", str(data), "--classes", "2", "--clips-per-class", "10", "--seconds", "0.5"])
    out = tmp_path_factory.mktemp("runs") / "run"
    run_script("train_audio.py", *audio_args(data, out), env=ONE_THREAD)
    return data, out


def copied(source, target, keep_times=False):
    """A copy as `cp -r` makes it: new modification times, unless keep_times (`cp -a`, rsync -a)."""
    shutil.copytree(source, target, copy_function=shutil.copy2 if keep_times else shutil.copy)
    return target


@pytest.fixture
def audio_copy(audio_run, tmp_path):
    """The data and the run folder copied to new places, as to node-local scratch."""
    data, out = audio_run
    return copied(data, tmp_path / "scratch" / "sc"), copied(out, tmp_path / "run", keep_times=True)


def folder_state(out):
    """Every file of the run folder with its size and modification time (the lock file is rewritten by every start)."""
    return {
        p.relative_to(out): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file() and p.name != ".lock"
    }


def refused_keys(script, args, out) -> set[str]:
    """Resume with these arguments; it must be refused and leave the run folder as it was. The keys it names."""
    before = folder_state(out)
    proc = run_script(script, *args, "--resume", check=False, env=ONE_THREAD)
    assert proc.returncode != 0 and "--resume refused" in proc.stderr, proc.stderr[-3000:]
    assert folder_state(out) == before
    return {line.split(":")[0].strip() for line in proc.stderr.splitlines() if " in the checkpoint, " in line}


def train_files(data):
    listed = set((data / "validation_list.txt").read_text().split()) | set((data / "testing_list.txt").read_text().split())
    return sorted(p for p in data.glob("*/*.wav") if p.relative_to(data).as_posix() not in listed and p.parent.name[0] != "_")


@pytest.mark.parametrize("keep_times", [False, True], ids=["cp -r", "cp -a"])
def test_the_same_data_copied_elsewhere_resumes(audio_run, tmp_path, keep_times):
    data, out = audio_run
    scratch = copied(data, tmp_path / "scratch" / "sc", keep_times)
    run = copied(out, tmp_path / "run", keep_times=True)
    relative = os.path.relpath(scratch)  # given as a relative path where the run had an absolute one
    proc = run_script("train_audio.py", *audio_args(relative, run), "--resume", env=ONE_THREAD)
    assert "resumed from" in proc.stdout


def test_a_training_file_replaced_under_its_name_is_refused(audio_copy):
    data, out = audio_copy
    first, second = train_files(data)[:2]
    times = first.stat()
    first.write_bytes(second.read_bytes())  # the same size: only the content tells
    os.utime(first, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert refused_keys("train_audio.py", audio_args(data, out), out) == {"train files"}


def test_an_extra_background_noise_file_is_refused(audio_copy):
    data, out = audio_copy
    noise = data / "_background_noise_"
    shutil.copy(noise / "white_noise.wav", noise / "extra.wav")
    assert refused_keys("train_audio.py", audio_args(data, out), out) == {"noise files"}


@pytest.mark.parametrize(
    "change, key",
    [(["--speed", 0.2], "speed"), (["--mixed-precision", "bf16"], "mixed_precision"), (["--batch-size", 4], "batch_size")],
)
def test_a_changed_recipe_is_refused_and_nothing_is_written(audio_copy, change, key):
    data, out = audio_copy
    args = audio_args(data, out) + change  # argparse takes the last of a repeated flag
    assert refused_keys("train_audio.py", args, out) == {key}


# ----------------------------------------------------------------------------- detection


def detection_args(data, out, *extra):
    return [
        "--data", data, "--output-dir", out, "--epochs", 1, "--img-size", 64, "--batch-size", 8, "--nominal-batch-size", 8,
        "--workers", 0, "--keep-checkpoints", 1, "--mixed-precision", "no", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_data")
    run_script("make_demo_detection.py", "--output-dir", root, "--train", 16, "--val", 4, "--test", 0, "--size", 64)
    out = tmp_path_factory.mktemp("det_runs") / "run"
    run_script("train_detection.py", *detection_args(root / "data.yaml", out), env=ONE_THREAD)
    return root, out


def test_detection_resumes_from_a_copy_and_refuses_changed_boxes_or_augmentation(detection_run, tmp_path):
    data, out = detection_run
    scratch, run = copied(data, tmp_path / "scratch"), copied(out, tmp_path / "run", keep_times=True)
    proc = run_script("train_detection.py", *detection_args(scratch / "data.yaml", run), "--resume", env=ONE_THREAD)
    assert "resumed from" in proc.stdout

    assert refused_keys("train_detection.py", detection_args(scratch / "data.yaml", run, "--no-augment"), run) == {"no_augment"}
    label = sorted((scratch / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text().replace("0.", "0.1", 1))  # one box moved: the image is the same
    assert refused_keys("train_detection.py", detection_args(scratch / "data.yaml", run), run) == {"train files"}
