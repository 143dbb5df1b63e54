"""Each training script's docstring lists the files to copy to reuse it; exactly those files train on their own."""

import shutil
import subprocess
import sys

import make_demo_audio
import make_demo_detection
import pytest
from conftest import REPO, script_env


def files_to_copy(script: str) -> list[str]:
    doc = (REPO / "scripts" / script).read_text().split('"""')[1]
    listed = doc.split("copy these files, keeping their folders:")[1]
    return listed.split()


@pytest.mark.parametrize("script", ["train_audio.py", "train_detection.py"])
def test_the_listed_files_alone_train_one_epoch(script, tmp_path):
    project = tmp_path / "project"
    for name in files_to_copy(script):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, project / name)
    if script == "train_audio.py":
        make_demo_audio.main(["--output", str(tmp_path / "data"), "--classes", "2", "--clips-per-class", "8", "--seconds", "0.5"])
        args = [
            "--data", tmp_path / "data", "--sample-rate", 8000, "--n-mels", 32, "--clip-seconds", 0.5, "--cache-dir",
            tmp_path / "cache", "--mixed-precision", "bf16",  # the suite's one bf16 training run: small, as bf16 is slow
        ]  # fmt: skip
    else:
        make_demo_detection.main(
            ["--output-dir", str(tmp_path / "data"), "--train", "8", "--val", "2", "--test", "0", "--size", "64"]
        )
        args = ["--data", tmp_path / "data" / "data.yaml", "--img-size", 64]
    args += ["--output-dir", tmp_path / "run", "--epochs", 1, "--batch-size", 4, "--nominal-batch-size", 4, "--workers", 0]
    env = script_env(PYTHONPATH="")  # nothing from the repository but the copied files
    proc = subprocess.run(
        [sys.executable, str(project / "scripts" / script), *map(str, args)], env=env, cwd=project, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and (tmp_path / "run" / "metrics.json").is_file()
