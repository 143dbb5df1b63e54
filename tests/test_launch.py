"""Launch paths a user takes, end to end on CPU: accelerate presets, two "machines" on loopback, and
presets this machine cannot honour (which must stop with the fix, not run something else)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, free_port, script_env

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "speech"
    script = str(REPO / "scripts/make_demo_audio.py")
    subprocess.run(
        [sys.executable, script, "--output", str(root), *"--classes 3 --clips-per-class 16".split()],
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="module")
def detection_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "shapes"
    script = str(REPO / "scripts/make_demo_detection.py")
    subprocess.run(
        [sys.executable, script, "--output-dir", str(root), *"--train 16 --val 5 --test 0 --size 128".split()],
        check=True,
        capture_output=True,
    )
    return root


def audio_args(data, out):
    return [
        "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--batch-size", "8", "--nominal-batch-size", "16",
        "--workers", "0", "--cache-dir", str(out.parent / "cache"),
    ]  # fmt: skip


def launch(*args, env=None, timeout=300):
    return subprocess.run(
        [*ACCELERATE, *map(str, args)], env=script_env(**(env or {})), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def assert_trained(out, processes, proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    args = json.loads((out / "args.json").read_text())
    assert args["num_processes"] == processes
    assert args["accumulation_steps"] == 16 // (8 * processes)
    assert (out / "model" / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_cpu_preset_trains_in_one_process(audio_data, tmp_path):
    out = tmp_path / "run"
    proc = launch(
        "--config_file", REPO / "accelerate_configs/cpu.yaml", REPO / "scripts/train_audio.py", *audio_args(audio_data, out)
    )
    assert_trained(out, 1, proc)


def test_cpu_2proc_preset_trains_detection_in_two_processes(detection_data, tmp_path):
    out = tmp_path / "run"
    proc = launch(
        "--config_file",
        REPO / "accelerate_configs/cpu_2proc.yaml",
        "--main_process_port",
        free_port(),
        REPO / "scripts/train_detection.py",
        "--cpu",
        "--data",
        detection_data / "data.yaml",
        "--output-dir",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--nominal-batch-size",
        "16",
        "--workers",
        "0",
        "--img-size",
        "128",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert_trained(out, 2, proc)


def test_two_machines_on_loopback(audio_data, tmp_path):
    """--num_machines 2 with machine ranks 0 and 1 on 127.0.0.1: the multi-node path, one process per 'machine'."""
    out, port = tmp_path / "run", free_port()
    machines = [
        subprocess.Popen(
            [
                *ACCELERATE,
                "--multi_gpu",
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--rdzv_backend",
                "static",
                str(REPO / "scripts/train_audio.py"),
                "--cpu",
                *audio_args(audio_data, out),
            ],
            env=script_env(OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=300) for m in machines]
    for machine, (stdout, stderr) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert_trained(out, 2, machines[0])


@pytest.mark.parametrize(
    "preset, message",
    [
        ("gpu1_fp16.yaml", "fp16 mixed precision needs a GPU"),
        ("gpu4_fp16.yaml", "this machine has none"),
    ],
)
def test_presets_this_machine_cannot_run_stop_with_the_fix(audio_data, tmp_path, preset, message):
    proc = launch(
        "--config_file",
        REPO / "accelerate_configs" / preset,
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
        REPO / "scripts/train_audio.py",
        *audio_args(audio_data, tmp_path / "run"),
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "run" / "model").exists()


# ----------------------------------------------------------------------------- preemption on every launch path


def preempted_commands(script, args, port):
    """What a user starts, by launch path: the process that receives SIGTERM is the first in the list.
    Plain python is covered by the resume tests of each script."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    presets = REPO / "accelerate_configs"
    return {
        "torchrun, 2 processes": [*torchrun, script, *args],
        "accelerate launch, 1 process": [*ACCELERATE, "--config_file", presets / "cpu.yaml", script, *args],
        "accelerate launch, 2 processes": [
            *ACCELERATE, "--config_file", presets / "cpu_2proc.yaml", "--main_process_port", port, script, "--cpu", *args
        ],
    }  # fmt: skip


def preemption_args(data, out):
    return [*audio_args(data, out), "--epochs", "4", "--batch-size", "4", "--nominal-batch-size", "4", "--checkpoint-steps", "1"]


def start_and_preempt(cmd, out, tmp_path, env) -> tuple[float, str]:
    """Start cmd in its own process group, SIGTERM its first process once a checkpoint exists, and wait
    until every process of the group (orphans included) has exited. Returns seconds from signal to exit, output."""
    log = (tmp_path / "log.txt").open("w+")
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be preempted"
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    while time.time() - signalled < 60:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    seconds = time.time() - signalled
    log.seek(0)
    return seconds, log.read()


@pytest.mark.parametrize(
    "path", ["torchrun, 2 processes", "accelerate launch, 1 process", "accelerate launch, 2 processes", "make"]
)
def test_sigterm_to_what_the_user_started_ends_in_a_checkpoint(audio_data, tmp_path, path):
    out = tmp_path / "run" / "audio"
    args = preemption_args(audio_data, out)
    env = script_env(OMP_NUM_THREADS="1", **({"ACCELERATE_USE_CPU": "true"} if path.startswith("torchrun") else {}))
    if path == "make":
        cmd = ["make", "--no-print-directory", "-C", REPO, "train-audio", f"DATA={audio_data}", f"OUT={out.parent}",
               f"ARGS={' '.join(args[4:])}"]  # fmt: skip
    else:
        cmd = preempted_commands(REPO / "scripts/train_audio.py", args, free_port())[path]
    seconds, log = start_and_preempt(cmd, out, tmp_path, env)
    assert seconds < 30 and "checkpoint saved" in log, log[-3000:]
    assert not (out / "metrics.json").exists()
    progress = json.loads((sorted((out / "checkpoints").glob("step_*"))[-1] / "progress.json").read_text())
    assert progress["step"] > 1 and progress["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    if path == "accelerate launch, 1 process":  # the launcher died at once; its orphan saved: resume to the end
        # Without a checkpoint every step from here on (how often to save is not part of the run's schedule).
        resume_args = [*args[: args.index("--checkpoint-steps")], "--resume"]
        cmd = preempted_commands(REPO / "scripts/train_audio.py", resume_args, free_port())[path]
        resumed = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
        assert (out / "metrics.json").is_file()
