"""Trust contract: --overwrite deletes a run's outputs and nothing else; a folder holding any run output is a run;
a SIGTERM from the first second of a launch ends every process of it; a damaged checkpoint is named, not skipped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import make_demo_audio
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, run_script, script_env

from shared.checkpoint import Checkpoints, RunFolder

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_run_folder") / "speech"
    make_demo_audio.main(["--output", str(root), "--classes", "2", "--clips-per-class", "8", "--seconds", "0.5"])
    return root


def audio_args(data, out, epochs=1):
    return [
        "--data", data, "--output-dir", out, "--epochs", epochs, "--batch-size", 4, "--nominal-batch-size", 4,
        "--clip-seconds", 0.5, "--sample-rate", 8000, "--n-mels", 32, "--workers", 0,
    ]  # fmt: skip


def train(data, out, *extra, check=True):
    return run_script("train_audio.py", *audio_args(data, out), *extra, check=check, env=ONE_THREAD)


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- --overwrite deletes only run outputs


def test_overwrite_refuses_data_inside_or_files_no_run_writes_and_deletes_nothing(clips, tmp_path):
    """The reported case: the data set trained on and thesis.tex beside a results.csv in the output folder."""
    proj = tmp_path / "proj"
    shutil.copytree(clips, proj / "sc")
    (proj / "results.csv").write_text("a,b\n")
    (proj / "thesis.tex").write_text("x\n")
    before = files(proj)
    inside = train(proj / "sc", proj, "--overwrite", check=False)
    assert inside.returncode != 0 and f"--data {proj / 'sc'} lies inside --output-dir {proj}" in inside.stderr
    beside = train(clips, proj, "--overwrite", check=False)
    assert beside.returncode != 0 and "holds files no run writes: sc/, thesis.tex." in beside.stderr
    assert files(proj) == before


def test_overwrite_replaces_a_real_run_and_a_lone_model_is_a_run(clips, tmp_path):
    out, data = tmp_path / "run", files(clips)
    train(clips, out)
    first = json.loads((out / "run.json").read_text())["run_id"]
    (out / "model" / "model.onnx").write_bytes(b"exported")
    lone = tmp_path / "lone"
    shutil.copytree(out / "model", lone / "model")
    refused = train(clips, lone, check=False)
    assert refused.returncode != 0 and f"{lone} already holds a run (model/)" in refused.stderr
    assert (lone / "model" / "model.onnx").is_file()

    train(clips, out, "--overwrite")
    assert json.loads((out / "run.json").read_text())["run_id"] != first
    assert (out / "metrics.json").is_file() and not (out / "model" / "model.onnx").exists()
    assert files(clips) == data


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def claim(accelerator, folder, **kwargs):
    run = RunFolder(accelerator, folder, resume=kwargs.pop("resume", None), overwrite=kwargs.pop("overwrite", False), **kwargs)
    run._lock.close()  # this run has ended: the next claim may take the folder
    return run


def test_overwrite_deletes_every_kind_of_run_output_of_both_scripts(accelerator, tmp_path):
    out = tmp_path / "run"
    for name in ["predictions_val.json", "ground_truth_val.json", "cv_metrics.json", "labels.png", "args.json.tmp"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    for folder in ["fold_1/model", "fold_1/checkpoints/step_00000003", "logs"]:
        (out / folder).mkdir(parents=True)
    (out / "fold_1" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a run \\(cv_metrics.json, fold_1/, ground_truth_val.json, pre"):
        claim(accelerator, out)
    claim(accelerator, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "run.json"]


@pytest.mark.parametrize("where", ["fold_2/notes.txt", "paper/draft.tex"])
def test_overwrite_refuses_files_no_run_writes_also_inside_a_fold(accelerator, tmp_path, where):
    out = tmp_path / "run"
    (out / "fold_2" / "model").mkdir(parents=True)
    (out / where).parent.mkdir(parents=True, exist_ok=True)
    (out / where).write_text("mine")
    before = files(out)
    shown = where if where.startswith("fold_") else "paper/"
    with pytest.raises(SystemExit, match=f"holds files no run writes: {shown}\\. .*Nothing was deleted"):
        claim(accelerator, out, overwrite=True)
    assert files(out) == before


def test_overwrite_refuses_a_data_file_inside_the_output_folder(accelerator, tmp_path):
    out = tmp_path / "run"
    (out / "metrics.json").parent.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="lies inside --output-dir"):
        claim(accelerator, out, overwrite=True, data=out / "metrics.json")  # a data file by any name
    assert (out / "metrics.json").is_file()


# ----------------------------------------------------------------------------- a damaged checkpoint is named


def test_a_damaged_progress_json_is_named_not_skipped_for_an_older_checkpoint(accelerator, tmp_path):
    model = torch.nn.Linear(3, 2)
    run = RunFolder(accelerator, tmp_path / "run", resume=None, overwrite=False)
    ckpts = Checkpoints(accelerator, run, keep=3, fingerprint={}, modules={"model": model}, states={})
    ckpts.save({"epoch": 0, "batch_in_epoch": 1, "step": 1})
    newest = ckpts.save({"epoch": 0, "batch_in_epoch": 2, "step": 2})
    (newest / "progress.json").write_text('{"epoch": 0, "step": 2, "run_')
    with pytest.raises(SystemExit, match=f"checkpoint {newest} is damaged: {newest / 'progress.json'} cannot be read"):
        ckpts.resume("latest")


# ----------------------------------------------------------------------------- SIGTERM from the first second


def children(pid: int) -> list[int]:
    try:
        return [
            int(c) for task in os.listdir(f"/proc/{pid}/task") for c in open(f"/proc/{pid}/task/{task}/children").read().split()
        ]
    except OSError:
        return []


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_end_within(pids: list[int], seconds: float) -> bool:
    deadline = time.time() + seconds
    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.05)
    return not any(map(running, pids))


def test_an_early_sigterm_to_a_one_process_accelerate_launch_leaves_no_orphan(clips, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO / "accelerate_configs" / "cpu.yaml",
        REPO / "scripts" / "train_audio.py", *audio_args(clips, out, epochs=4),
    ]  # fmt: skip
    launcher = subprocess.Popen(
        list(map(str, cmd)), env=script_env(**ONE_THREAD), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    script = []
    try:
        deadline = time.time() + 120
        while not script and launcher.poll() is None and time.time() < deadline:
            script = children(launcher.pid)
            time.sleep(0.02)
        assert script, "the launcher never started the script"
        time.sleep(0.5)  # the script is importing torch now
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        assert all_end_within(script, 10), "the script outlived its launcher"
        assert not (out / "checkpoints").exists()
    finally:
        for pid in filter(running, script):
            os.kill(pid, signal.SIGKILL)


WORKERS_OF_A_DYING_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from shared.preemption import end_with_the_launcher
end_with_the_launcher()
import numpy as np, torch

class Large(torch.utils.data.Dataset):  # 8 MB a sample: a worker blocks sending it while its parent does not read
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return np.zeros(1 << 20)

batches = iter(torch.utils.data.DataLoader(Large(), batch_size=1, num_workers=2, collate_fn=list))
next(batches)
print(*[c for t in os.listdir("/proc/self/task") for c in open(f"/proc/self/task/{t}/children").read().split()], flush=True)
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_decode_workers_end_with_a_script_killed_before_its_loop(tmp_path):
    """SIGTERM before GracefulStop ends the script at once; its DataLoader workers (cache decoding) must not live on."""
    proc = subprocess.run(
        [sys.executable, "-c", WORKERS_OF_A_DYING_SCRIPT, str(REPO)], env=script_env(**ONE_THREAD), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    workers = [int(pid) for pid in proc.stdout.split()]
    try:
        assert proc.returncode == -signal.SIGTERM and len(workers) == 2, proc.stderr[-2000:]
        assert all_end_within(workers, 10), "DataLoader workers outlived the script"
    finally:
        for pid in filter(running, workers):
            os.kill(pid, signal.SIGKILL)
