"""The shared package: accumulation from the process count, refused launches, schedules, EMA, checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, free_port, script_env

from shared.checkpoint import Checkpoints, RunFolder
from shared.training import build_scheduler

SETUP_SNIPPET = """
import argparse, sys
sys.path.insert(0, {repo!r})
from shared.runtime import add_common_args, setup_accelerator
p = argparse.ArgumentParser(); add_common_args(p, epochs=1, batch_size=16, nominal_batch_size=64)
args = p.parse_args(sys.argv[1:])
acc, plan = setup_accelerator(args)
print("ACCUM", plan.accumulation_steps, plan.effective_batch_size, plan.processes, acc.device.type)
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
    from shared.training import warmup_momentum

    warmup_momentum(opt, 5, 10, 0.8, 0.9)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)


def test_ema_ramps_its_decay_and_averages_buffers():
    model = torch.nn.BatchNorm1d(2)
    from detection_model import make_ema

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
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
    return acc, model, opt, sched, tmp_path / "run"


FINGERPRINT = {"model": "linear", "labels": ["a", "b"], "batch_size": 16, "files": "abc"}


def checkpoints(acc, model, opt, sched, run, fingerprint=FINGERPRINT, keep=2):
    return Checkpoints(
        acc, run, keep=keep, fingerprint=fingerprint, modules={"model": model}, states={"optimizer": opt, "scheduler": sched}
    )


def train_step(model, opt, sched):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()


def test_checkpoints_keep_the_newest_and_ignore_an_interrupted_save(trained_bits, monkeypatch):
    acc, model, opt, sched, directory = trained_bits
    ckpts = checkpoints(acc, model, opt, sched, RunFolder(acc, directory, resume=None, overwrite=False))
    for step in (1, 2, 3):
        train_step(model, opt, sched)
        ckpts.save({"epoch": 0, "batch_in_epoch": step, "step": step})
    assert [p.name for p in ckpts.completed()] == ["step_00000002", "step_00000003"]
    weights_at_3, lr_at_3 = model.weight.detach().clone(), sched.get_last_lr()
    momentum_at_3 = opt.state_dict()["state"][0]["momentum_buffer"].clone()

    def die_half_way(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpts, "_write_state", die_half_way)
    train_step(model, opt, sched)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save({"epoch": 0, "batch_in_epoch": 4, "step": 4})
    monkeypatch.undo()
    assert ckpts.completed()[-1].name == "step_00000003"
    progress = ckpts.resume("latest")
    assert progress["step"] == 3
    assert torch.equal(model.weight, weights_at_3) and sched.get_last_lr() == lr_at_3
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], momentum_at_3)


def test_resume_with_other_settings_is_refused_listing_every_difference(trained_bits):
    acc, model, opt, sched, directory = trained_bits
    run = RunFolder(acc, directory, resume=None, overwrite=False)
    checkpoints(acc, model, opt, sched, run).save({"epoch": 1, "batch_in_epoch": 0, "step": 5})
    changed = {**FINGERPRINT, "labels": ["a", "c"], "batch_size": 8}
    with pytest.raises(SystemExit) as refused:
        checkpoints(acc, model, opt, sched, run, changed).resume("latest")
    message = str(refused.value)
    assert "--resume refused" in message and "--overwrite" in message
    assert (
        "batch_size: 16 in the checkpoint, 8 now" in message and 'labels: ["a", "b"] in the checkpoint, ["a", "c"] now' in message
    )
    assert "files" not in message and "model:" not in message
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        checkpoints(acc, model, opt, sched, run).resume(str(directory))


def test_a_fresh_run_never_reuses_a_folder_that_holds_a_run(trained_bits):
    acc, model, opt, sched, directory = trained_bits
    first = RunFolder(acc, directory, resume=None, overwrite=False)
    checkpoints(acc, model, opt, sched, first).save({"epoch": 1, "batch_in_epoch": 0, "step": 8})
    (directory / "metrics.json").write_text("{}")
    first._lock.close()  # the first run has ended
    with pytest.raises(SystemExit, match="already holds a run .*--resume.*--overwrite"):
        RunFolder(acc, directory, resume=None, overwrite=False)
    again = RunFolder(acc, directory, resume="latest", overwrite=False)
    assert again.run_id == first.run_id
    again._lock.close()
    fresh = RunFolder(acc, directory, resume=None, overwrite=True)
    assert fresh.run_id != first.run_id
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "run.json"]


def test_a_second_live_run_cannot_share_the_folder(trained_bits):
    acc, _, _, _, directory = trained_bits
    live = RunFolder(acc, directory, resume=None, overwrite=False)
    with pytest.raises(SystemExit, match=f"in use by a live run \\(pid {os.getpid()}"):
        RunFolder(acc, directory, resume="latest", overwrite=False)
    live._lock.close()
    RunFolder(acc, directory, resume="latest", overwrite=False)


def test_pruning_and_latest_see_only_this_runs_checkpoints(trained_bits):
    """An older run's step_8 (here: copied in) is neither pruned by nor resumed into a run at step 1."""
    acc, model, opt, sched, directory = trained_bits
    old = RunFolder(acc, directory, resume=None, overwrite=False)
    checkpoints(acc, model, opt, sched, old).save({"epoch": 2, "batch_in_epoch": 0, "step": 8})
    old._lock.close()
    new = RunFolder(acc, directory, resume=None, overwrite=True)
    run_b = checkpoints(acc, model, opt, sched, new, keep=1)
    other_run = directory / "checkpoints" / "step_00000008"
    other_run.mkdir(parents=True)
    (other_run / "progress.json").write_text(json.dumps({"step": 8, "epoch": 2, "batch_in_epoch": 0, "run_id": old.run_id}))
    run_b.save({"epoch": 0, "batch_in_epoch": 1, "step": 1})
    assert other_run.exists() and [p.name for p in run_b.completed()] == ["step_00000001"]
    assert run_b.resume("latest")["step"] == 1
    with pytest.raises(SystemExit, match=f"belongs to run {old.run_id}"):
        run_b.resume(str(other_run))


def test_resuming_an_older_checkpoint_discards_the_newer_ones(trained_bits):
    acc, model, opt, sched, directory = trained_bits
    ckpts = checkpoints(acc, model, opt, sched, RunFolder(acc, directory, resume=None, overwrite=False), keep=3)
    for step in (1, 2, 3):
        ckpts.save({"epoch": 0, "batch_in_epoch": step, "step": step})
    ckpts.resume(str(directory / "checkpoints" / "step_00000001"))
    assert [p.name for p in ckpts.completed()] == ["step_00000001"]


class Payload:
    """Unpickling this runs a shell command: what a planted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_run(trained_bits, tmp_path):
    acc, model, opt, sched, directory = trained_bits
    ckpts = checkpoints(acc, model, opt, sched, RunFolder(acc, directory, resume=None, overwrite=False))
    path = ckpts.save({"epoch": 0, "batch_in_epoch": 1, "step": 1})
    marker = tmp_path / "payload_ran"
    # Where accelerate's load_state used to unpickle registered objects, and the project's own state file.
    torch.save(Payload(marker), path / "custom_checkpoint_0.pkl")
    torch.save({"optimizer": Payload(marker)}, path / "state.pt")
    with pytest.raises(SystemExit, match="state.pt holds objects other than tensors"):
        ckpts.resume("latest")
    assert not marker.exists()


def run_in_two_processes(script) -> subprocess.CompletedProcess:
    """Real 2-process DDP on CPU (gloo), as torchrun starts it."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script)],
        env=script_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )


STEP_GUARD_SNIPPET = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from accelerate import Accelerator
from shared.checkpoint import GracefulStop
from shared.training import EpochLosses, RunState, agree
acc = Accelerator(cpu=True)
state = RunState(epoch=2, step=6)
losses = EpochLosses(acc, state)
losses.add({{"loss": torch.tensor(1.0)}}, 4)
nan_here = acc.process_index == acc.num_processes - 1
losses.add({{"loss": torch.tensor(float("nan") if nan_here else 2.0)}}, 4)
try:
    agree(acc, GracefulStop(), losses, epoch=state.epoch, step=state.step + 1)  # as the script does before a step
except SystemExit as err:
    os.write(1, f"rank {{acc.process_index}} stopped: {{err}}\\n".encode())  # one write: the two ranks share the pipe
    raise
"""


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    script = tmp_path / "guard.py"
    script.write_text(STEP_GUARD_SNIPPET.format(repo=str(REPO)))
    out = run_in_two_processes(script)
    assert out.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: the training loss became NaN or infinite at epoch 3, optimizer step 7" in out.stdout


AGREE_SNIPPET = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
from accelerate import Accelerator
from shared.runtime import seed_per_process, smallest_over_processes
acc = Accelerator(cpu=True)
batch = smallest_over_processes([48, 32][acc.process_index])
seed_per_process(acc, 0)
# One write per rank: a single write of a short line to a pipe is never interleaved with the other rank's.
os.write(1, f"rank {{acc.process_index}} uses {{batch}}\\nrank {{acc.process_index}} draws {{torch.rand(1).item()}}\\n".encode())
"""


def test_processes_agree_on_the_batch_and_draw_their_own_augmentation(tmp_path):
    """Cards with different free memory probe different batches: every process must train with the smallest.
    Augmentation must differ between processes (or every rank would see the same crops and noise)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SNIPPET.format(repo=str(REPO)))
    out = run_in_two_processes(script)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0 uses 32" in out.stdout and "rank 1 uses 32" in out.stdout
    draws = {line.split()[1]: line.split()[-1] for line in out.stdout.splitlines() if " draws " in line}
    assert len(draws) == 2 and draws["0"] != draws["1"], out.stdout


def test_the_spellings_users_bring_are_read_as_ours(tmp_path):
    """Hugging Face's underscore flags and torchvision's names, in both scripts; a misspelling still fails."""
    import train_audio
    import train_detection

    familiar = [
        "--data", "d", "--output_dir", tmp_path, "--mixed_precision", "bf16", "--checkpointing_steps", "5",
        "--resume_from_checkpoint", "--test-only", "--wd", "0.05", "--warmup_epochs=2",
    ]  # fmt: skip
    for script in (train_audio, train_detection):
        args = script.parse_args(familiar)
        assert (args.output_dir, args.mixed_precision, args.checkpoint_steps) == (tmp_path, "bf16", 5)
        assert (args.resume, args.eval_only, args.weight_decay, args.warmup_epochs) == ("latest", True, 0.05, 2.0)
    hf_and_torchvision = ["--data", "d", "--output_dir", tmp_path, "--num_train_epochs", "3", "--learning_rate", "0.02",
                          "-b", "8", "-j", "0", "--logging_steps", "5", "--max_train_samples", "40"]  # fmt: skip
    for script in (train_audio, train_detection):
        args = script.parse_args(hf_and_torchvision)
        assert (args.epochs, args.lr, args.batch_size, args.workers, args.log_every, args.max_train_samples) == (
            3,
            0.02,
            8,
            0,
            5,
            40,
        )
    assert "--output_dir" in train_audio.parse_args.__globals__["SPELLINGS"]
    with pytest.raises(SystemExit):
        train_detection.parse_args(["--data", "d", "--output_dir", tmp_path, "--weight_decy", "0.1"])
