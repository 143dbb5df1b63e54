"""Helpers every test module uses: run a launchkit script as a user would, in 1 or 2 processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="session", autouse=True)
def caches_in_a_folder_of_the_session(tmp_path_factory):
    """The decode caches of every run the tests start (and of the scripts' default --cache-dir) go to a folder of this
    test session, not to the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


def load_metric(name: str):
    """One of the evaluate modules the training scripts load by path (scripts/metrics/NAME)."""
    return evaluate.load(str(REPO / "scripts" / "metrics" / name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    env.update(extra)
    return env


def run_script(script: str, *args, nproc: int = 1, env: dict | None = None, check: bool = True, timeout: float = 600):
    """Run scripts/<script> with plain python (nproc=1) or real DDP on CPU through torchrun (nproc>1)."""
    path = str(REPO / "scripts" / script)
    if nproc == 1:
        cmd = [sys.executable, path]
        run_env = script_env(**(env or {}))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", path]
        run_env = script_env(**{"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})})
    proc = subprocess.run(cmd + [str(a) for a in args], env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
