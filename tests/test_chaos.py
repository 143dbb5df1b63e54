"""kill -9 at any moment stays harmless: each task's tiny run, SIGKILLed while it decodes its cache, in mid-epoch and
in its final test, and started again with --resume after each kill, ends with the uninterrupted run's weights (bit
for bit), results.csv rows and metrics. The long version, 20 kills at random moments, is benchmarks/chaos.py."""

import random
import sys

import make_demo_audio
import pytest
from conftest import REPO, run_script, script_env

from benchmarks.chaos import (
    DECODE,
    FINAL,
    Attempt,
    Kill,
    after_step,
    chaos_run,
    describe,
    max_weight_difference,
    metrics_without_timing,
    results_without_timing,
)

# One thread on both sides: CPU kernels round differently per thread count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def audio_run(root):
    """UrbanSound8K layout (mixed rates, stereo, 24-bit: a decode long enough to be caught in) with 3 folds:
    3 steps per epoch, 2 epochs."""
    make_demo_audio.main(["--layout", "urbansound8k", "--folds", "3", "--clips-per-class", "24", "--seconds", "1",
                          "--output", str(root / "us8k")])  # fmt: skip
    args = ["--data", root / "us8k", "--fold", 1, "--epochs", 2, "--clip-seconds", 0.5, "--sample-rate", 8000, "--n-mels",
            32, "--model", "mobilenet_v3_small", "--batch-size", 8, "--nominal-batch-size", 8, "--mixup", 0.2]  # fmt: skip
    return "train_audio.py", args, 3


def detection_run(root):
    """Large images scaled to 64 px (a decode long enough to be caught in): 4 steps per epoch, 2 epochs."""
    run_script("make_demo_detection.py", "--output-dir", root / "shapes", "--train", 24, "--val", 4, "--test", 2,
               "--size", 480)  # fmt: skip
    args = ["--data", root / "shapes" / "data.yaml", "--epochs", 2, "--img-size", 64, "--batch-size", 6,
            "--nominal-batch-size", 6, "--multi-scale"]  # fmt: skip
    return "train_detection.py", args, 4


@pytest.mark.parametrize("make_run", [audio_run, detection_run], ids=["audio", "detection"])
def test_sigkill_while_decoding_mid_epoch_and_in_the_final_test_changes_nothing(make_run, tmp_path):
    script, args, steps_per_epoch = make_run(tmp_path)

    def command(name):
        common = ["--output-dir", tmp_path / name, "--cache-dir", tmp_path / f"cache_{name}", "--workers", 0,
                  "--checkpoint-steps", 1, "--mixed-precision", "no"]  # fmt: skip
        return [sys.executable, str(REPO / "scripts" / script), *map(str, args + common)]

    env = script_env(**ONE_THREAD)
    # The uninterrupted run alongside: the kills aim at progress, not at clock times, so sharing the cores is harmless.
    reference = Attempt(command("reference"), env, "uninterrupted")
    rng = random.Random(8)
    # In the second epoch: the start after it resumes mid-epoch with a results.csv row to keep.
    mid_epoch = rng.randrange(steps_per_epoch + 1, 2 * steps_per_epoch)
    # The final test of these tiny runs lasts about 50 ms, less on a fast machine: that kill comes the moment it starts.
    kills = [Kill(DECODE), after_step(mid_epoch, rng.uniform(0, 0.2)), Kill(FINAL)]
    records = chaos_run(command("killed"), kills, env, timeout=300)
    assert reference.wait(300) == 0, reference.log.read_text()[-3000:]
    print("\n" + describe(records))

    assert [r["killed"] for r in records] == [True, True, True, False] and records[-1]["landed"] == "exited 0", records
    landed = [r["landed"].split(",")[0] for r in records]
    assert landed[0] == "decode" and landed[1].startswith("epoch") and landed[2] == "final test", records
    assert records[1]["resume"] == "from scratch (no checkpoint yet)", records  # the decode kill came before step 1
    assert max_weight_difference(tmp_path / "reference", tmp_path / "killed") == 0
    assert results_without_timing(tmp_path / "killed") == results_without_timing(tmp_path / "reference")
    assert metrics_without_timing(tmp_path / "killed") == metrics_without_timing(tmp_path / "reference")
    # Nothing half-written stays behind: the next save or cache build removes what a kill interrupted.
    leftovers = [*(tmp_path / "killed" / "checkpoints").glob(".*"), *(tmp_path / "cache_killed").rglob(".*")]
    assert leftovers == [], leftovers
