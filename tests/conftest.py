"""Helpers every test module uses: run a launchkit script as a user would, in 1 or 2 processes; an offline Hub cache."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import huggingface_hub
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="session", autouse=True)
def caches_in_a_folder_of_the_session(tmp_path_factory):
    """The decode caches of every run the tests start (and of the scripts' default --cache-dir) go to a folder of this
    test session, not to the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache in tmp_path, offline, for this test: hub_cache(folder, "user/name") puts the
    folder's files in it as downloading dataset repo user/name leaves them, and returns the snapshot folder."""
    cache = tmp_path / "hub_cache"
    # huggingface_hub and datasets read HF_HUB_CACHE and HF_HUB_OFFLINE when imported: set what they read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return lambda folder, repo_id: downloaded(cache, folder, repo_id)


def downloaded(cache: Path, folder: Path, repo_id: str) -> Path:
    """huggingface_hub's layout: refs/main names the commit, whose snapshot links each file to its content in blobs/."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


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
