"""The shared package: accumulation from the process count, refused launches, schedules, EMA, checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, script_env

from shared.checkpoint import Checkpoints
from shared.ema import make_ema
from shared.schedule import build_scheduler, warmup_momentum

SETUP_SNIPPET = """
import argparse, sys
sys.path.insert(0, {repo!r})
from shared.runtime import add_common_args, setup_accelerator
p = argparse.ArgumentParser(); add_common_args(p, epochs=1, batch_size=16, nominal_batch_size=64)
args = p.parse_args(sys.argv[1:])
acc = setup_accelerator(args, "t")
print("ACCUM", args.accumulation_steps, args.effective_batch_size, args.num_processes, acc.device.type)
"""


def run_setup(tmp_path, *flags, **env):
    code = SETUP_SNIPPET.format(repo=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", code, "--output-dir", str(tmp_path), *flags],
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_accumulation_follows_nominal_batch(tmp_path):
    out = run_setup(tmp_path, "--batch-size", "16", "--nominal-batch-size", "64")
    assert "ACCUM 4 64 1 cpu" in out.stdout, out.stderr


def test_fp16_on_cpu_is_refused_with_the_alternative(tmp_path):
    out = run_setup(tmp_path, "--mixed-precision", "fp16")
    assert out.returncode != 0
    assert "fp16 mixed precision needs a GPU" in out.stderr and "bf16" in out.stderr


def test_gpu_launch_without_gpus_says_to_add_cpu(tmp_path):
    out = run_setup(tmp_path, WORLD_SIZE="2", LOCAL_RANK="1", RANK="1")
    assert out.returncode != 0
    assert "this machine has none" in out.stderr and "--cpu" in out.stderr


def test_warmup_then_cosine_counts_optimizer_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, final_lr_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.001 + 0.099 * 0.5, rel=1e-2)  # half-way through the cosine
    assert lrs[-1] == pytest.approx(0.001, rel=0.05)
    warmup_momentum(opt, 5, 10, 0.8, 0.9)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)


def test_ema_ramps_its_decay_and_averages_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = make_ema(model, decay=0.9, tau=1.0)
    ema.update_parameters(model)  # first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
    ema.update_parameters(model)
    d = 0.9 * (1 - torch.exp(torch.tensor(-2.0)))
    expected = d * 1.0 + (1 - d) * 3.0
    assert torch.allclose(ema.module.weight, expected.expand(2))
    assert torch.allclose(ema.module.running_mean, ((1 - d) * 2.0).expand(2))


@pytest.fixture
def trained_bits(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt, tmp_path / "checkpoints"


def test_checkpoints_keep_the_newest_and_ignore_an_interrupted_save(trained_bits, monkeypatch):
    acc, model, opt, directory = trained_bits
    ckpts = Checkpoints(acc, directory, keep=2, identity={"model": "linear", "labels": ["a", "b"]})
    for step in (1, 2, 3):
        ckpts.save({"epoch": 0, "batch_in_epoch": step, "step": step})
    assert [p.name for p in ckpts.completed()] == ["step_00000002", "step_00000003"]
    weights_at_3 = model.weight.detach().clone()

    def die_half_way(path):
        (directory / ".tmp_step_00000004").mkdir(exist_ok=True)
        (directory / ".tmp_step_00000004" / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(acc, "save_state", die_half_way)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save({"epoch": 0, "batch_in_epoch": 4, "step": 4})
    monkeypatch.undo()
    assert ckpts.completed()[-1].name == "step_00000003"
    progress = ckpts.resume("latest")
    assert progress["step"] == 3
    assert torch.equal(model.weight, weights_at_3)


def test_checkpoint_of_another_label_set_is_refused(trained_bits):
    acc, _, _, directory = trained_bits
    Checkpoints(acc, directory, keep=2, identity={"model": "linear", "labels": ["a", "b"]}).save(
        {"epoch": 1, "batch_in_epoch": 0, "step": 5}
    )
    other = Checkpoints(acc, directory, keep=2, identity={"model": "linear", "labels": ["a", "c"]})
    with pytest.raises(SystemExit, match="labels=.*new --output-dir"):
        other.resume("latest")
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        other.resume(str(directory))
    saved = json.loads((directory / "step_00000005" / "progress.json").read_text())
    assert saved["identity"]["labels"] == ["a", "b"]
