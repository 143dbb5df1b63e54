"""Launch paths a user takes, end to end on CPU: accelerate presets, two "machines" on loopback, and
presets this machine cannot honour (which must stop with the fix, not run something else)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, free_port, script_env

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "speech"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/make_demo_audio.py"),
            "--output",
            str(root),
            "--classes",
            "3",
            "--clips-per-class",
            "16",
        ],
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="module")
def detection_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "shapes"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/make_demo_detection.py"),
            "--output-dir",
            str(root),
            "--train",
            "16",
            "--val",
            "5",
            "--test",
            "0",
            "--size",
            "128",
        ],
        check=True,
        capture_output=True,
    )
    return root


def audio_args(data, out):
    return [
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--nominal-batch-size",
        "16",
        "--workers",
        "0",
        "--cache-dir",
        str(out.parent / "cache"),
    ]


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
