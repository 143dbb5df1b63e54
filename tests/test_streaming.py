"""train_audio.py --streaming: shards read through datasets' iterable datasets while training. Two processes with two
DataLoader workers each see every training clip in an epoch (a padding row or two aside) and count every evaluation
clip exactly once, uneven shard tails included; a run stopped mid-epoch (SIGTERM, or kill -9) and resumed ends as the
uninterrupted run; WebDataset tar shards stream the same clips as parquet."""

import collections
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import audio_data
import datasets
import make_demo_audio
import make_shards
import pytest
from accelerate import Accelerator
from audio_data import _decode_row
from conftest import REPO, free_port, run_script, script_env
from test_audio_train import ONE_THREAD, parameters, results_without_timing, stopped_at_first_checkpoint

from benchmarks.chaos import after_step, chaos_run, describe

RATE, WINDOW = 8000, 4000  # 0.5 s clips
COVERAGE = """
import hashlib, json, sys
sys.path[:0] = [{scripts!r}, {repo!r}]
from accelerate import Accelerator
import audio_data

accelerator = Accelerator(cpu=True)
data = audio_data.load_run_data({{"data": {shards!r}, "streaming": True}})
seen = {{}}
for name, split in data.splits.items():
    clips = audio_data.StreamedClips(split, {rate}, {window}, {window}, ("audio", "label"))
    loader = clips.loader(accelerator, 4, 2, 16 if name == "train" else None, seed=0)
    loader.set_epoch(1)
    seen[name] = [
        hashlib.sha1(wave[:length].numpy().tobytes()).hexdigest()
        for waves, targets, lengths in loader
        for wave, target, length in zip(waves, targets, lengths)
        if target >= 0
    ]
json.dump(seen, open({out!r} + f"/{{accelerator.process_index}}.json", "w"))
accelerator.end_training()
"""


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech") / "speech_commands"
    make_demo_audio.main(["--output", str(root), "--classes", "3", "--clips-per-class", "21", "--seconds", "0.5"])
    return root


def shards_of(speech, folder, rows_per_shard):
    make_shards.main(["audio", "--data", str(speech), "--output", str(folder), "--shard-size", str(rows_per_shard)])
    return folder


def clip_ids(shards) -> dict[str, list[str]]:
    """Each split's clips as one process without streaming reads them: the hash of each decoded clip."""
    loaded = datasets.load_dataset(str(shards)).cast_column("audio", datasets.Audio(decode=False))
    ids = {}
    for hub, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = [_decode_row(row, RATE, WINDOW, WINDOW, ("audio", "label")) for row in loaded[hub]]
        ids[name] = [hashlib.sha1(r["wave"][: r["length"]].tobytes()).hexdigest() for r in rows]
    return ids


@pytest.mark.parametrize("rows_per_shard", [10, 17])  # 51 training clips: 6 shards, split by shard; 3, split by row
def test_two_processes_see_every_clip_once(speech, tmp_path, rows_per_shard):
    shards = shards_of(speech, tmp_path / "shards", rows_per_shard)
    expected = clip_ids(shards)
    assert all(len(set(ids)) == len(ids) for ids in expected.values())  # distinct clips: a hash names one clip
    out = tmp_path / "seen"
    out.mkdir()
    harness = tmp_path / "coverage.py"
    harness.write_text(
        COVERAGE.format(scripts=str(REPO / "scripts"), repo=str(REPO), shards=str(shards), rate=RATE, window=WINDOW, out=str(out))
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(harness)]
    proc = subprocess.run(cmd, env=script_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1)]
    for name in ("val", "test"):  # evaluation: exactly once, padding dropped
        assert collections.Counter(seen[0][name] + seen[1][name]) == collections.Counter(expected[name]), name
    train = seen[0]["train"] + seen[1]["train"]
    assert len(seen[0]["train"]) == len(seen[1]["train"])  # the same steps on both processes
    assert set(train) == set(expected["train"])  # every clip in the epoch
    assert len(train) - len(expected["train"]) < 4  # only the rows that even out the two processes' batches repeat


def test_a_streamed_run_stopped_or_killed_mid_epoch_resumes_to_the_uninterrupted_result(speech, tmp_path):
    shards = shards_of(speech, tmp_path / "shards", 10)

    def args(out):
        return [
            "--data", shards, "--streaming", "--shuffle-buffer", 16, "--output-dir", out, "--epochs", 2, "--batch-size", 8,
            "--nominal-batch-size", 16, "--seed", 1, "--clip-seconds", 0.5, "--sample-rate", RATE, "--n-mels", 32,
            "--workers", 2, "--mixup", 0.2,
        ]  # fmt: skip

    one = tmp_path / "uninterrupted"
    first = run_script("train_audio.py", *args(one), env=ONE_THREAD)
    assert "streamed splits: train=train, val=validation, test=test" in first.stdout
    out = tmp_path / "resumed"
    latest = stopped_at_first_checkpoint([*args(out), "--checkpoint-steps", 1], out)
    progress = json.loads((latest / "progress.json").read_text())
    assert progress["epoch"] == 0 and 0 < progress["batch_in_epoch"] < 6, progress  # stopped inside the first epoch

    resumed = run_script("train_audio.py", *args(out), "--checkpoint-steps", 1, "--resume", env=ONE_THREAD)
    assert f"resumed from {latest}" in resumed.stdout
    a, b = parameters(one), parameters(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert results_without_timing(out) == results_without_timing(one)
    assert float(results_without_timing(one)[-1]["val_accuracy"]) > 0.6  # learned: three classes, chance is 1/3

    # kill -9 inside the second epoch (its shuffle differs from the first's), in the middle of the workers' decoding.
    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO / "scripts" / "train_audio.py"), *map(str, args(killed))]
    command += ["--checkpoint-steps", "1", "--cache-dir", str(tmp_path / "unused")]
    records = chaos_run(command, [after_step(5, 0.05)], script_env(**ONE_THREAD), timeout=300)
    assert records[0]["landed"].startswith("epoch 2, after step") and records[1]["landed"] == "exited 0", describe(records)
    a, b = parameters(one), parameters(killed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert results_without_timing(killed) == results_without_timing(one)


def write_webdataset(shards, folder):
    """The shards' clips as WebDataset tar files: NNNNN.wav (the file's bytes) and NNNNN.cls (the class id)."""
    loaded = datasets.load_dataset(str(shards)).cast_column("audio", datasets.Audio(decode=False))
    folder.mkdir()
    for split in ("train", "validation", "test"):
        with tarfile.open(folder / f"{split}-00000.tar", "w") as tar:
            for k, row in enumerate(loaded[split]):
                for suffix, payload in (("wav", row["audio"]["bytes"]), ("cls", str(row["label"]).encode())):
                    member = tarfile.TarInfo(f"{k:05d}.{suffix}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return folder


def streamed_clips(shards, columns: tuple[str, str]) -> dict[str, collections.Counter]:
    """Each split streamed in this process: the (hash of the decoded clip, class) of every row."""
    data = audio_data.load_run_data({"data": str(shards), "streaming": True, "audio_column": columns[0],
                                     "label_column": columns[1]})  # fmt: skip
    seen = {}
    for name, split in data.splits.items():
        loader = audio_data.StreamedClips(split, RATE, WINDOW, WINDOW, columns).loader(Accelerator(cpu=True), 4, 0, None, 0)
        seen[name] = collections.Counter(
            (hashlib.sha1(wave[:length].numpy().tobytes()).hexdigest(), int(target))
            for waves, targets, lengths in loader
            for wave, target, length in zip(waves, targets, lengths, strict=True)
        )
    return {"labels": data.labels, **seen}


def test_webdataset_tar_shards_stream_the_same_clips_with_class_ids_for_names(speech, tmp_path):
    shards = shards_of(speech, tmp_path / "shards", 17)
    parquet = streamed_clips(shards, ("audio", "label"))
    tars = streamed_clips(write_webdataset(shards, tmp_path / "wds"), ("wav", "cls"))
    assert tars.pop("labels") == ["0", "1", "2"] and len(parquet.pop("labels")) == 3
    assert tars == parquet and sum(parquet["train"].values()) == 51


def test_a_hub_id_streams_offline_from_the_hub_cache(speech, tmp_path, hub_cache):
    """--data user/name offline, the dataset repo downloaded to the Hub cache (make_shards.py's folder as pushed): the
    same classes and the same clips in each split as the folder, read from the cache's snapshot."""
    shards = shards_of(speech, tmp_path / "shards", 17)
    snapshot = hub_cache(shards, "someuser/speech")
    data = audio_data.load_run_data({"data": "someuser/speech", "streaming": True})
    assert all(f.startswith(f"{snapshot}/") for split in data.splits.values() for f in split.sources.files)
    assert streamed_clips("someuser/speech", ("audio", "label")) == streamed_clips(shards, ("audio", "label"))


def test_streaming_refuses_what_a_stream_cannot_do(speech, tmp_path):
    proc = run_script("train_audio.py", "--data", speech, "--streaming", "--eval-only", "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "--streaming trains on shards made for one split" in proc.stderr
    proc = run_script("train_audio.py", "--data", speech, "--streaming", "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0 and "needs a train and a validation split" in proc.stderr


def test_shards_with_training_pcm_stream_the_caches_clips_without_decoding(speech, tmp_path, monkeypatch):
    """make_shards.py --pcm stores each training clip as the cache holds it: streamed with that clip length, every
    training batch holds the cache's samples, byte for byte, with no clip decoded; with another span the clips are
    decoded (the cache's samples for that span), and evaluation splits decode theirs."""
    num_samples, span = RATE // 4, RATE * 3 // 4  # 0.25 s clips, kept up to 0.75 s: the 0.5 s clips whole
    decoded = tmp_path / "decoded"
    args = ["--sample-rate", str(RATE), "--clip-seconds", "0.25", "--shard-size", "8", "--pcm"]
    make_shards.main(["audio", "--data", str(speech), "--output", str(decoded), *args])
    column = audio_data.pcm_column(RATE, num_samples, span)
    data = audio_data.load_run_data({"data": str(decoded), "streaming": True})
    assert all(row[column] is None for row in data.splits["val"].sources.read([column]))  # evaluation decodes its clips

    def batches(end: int) -> list[tuple[bytes, int]]:
        clips = audio_data.StreamedClips(data.splits["train"], RATE, num_samples, end, ("audio", "label"))
        return [
            (wave[:length].numpy().tobytes(), int(target))
            for waves, targets, lengths in clips.loader(Accelerator(cpu=True), 4, 0, None, 0)
            for wave, target, length in zip(waves, targets, lengths, strict=True)
        ]

    def cached(end: int) -> list[tuple[bytes, int]]:
        split = audio_data.load_run_data({"data": str(speech)}).splits["train"]
        cache = audio_data.CachedClips(split, RATE, num_samples, tmp_path / "cache", span=end)
        return [(wave[:length].numpy().tobytes(), target) for wave, target, length in (cache[i] for i in range(len(cache)))]

    with monkeypatch.context() as patch:
        patch.setattr(audio_data, "read_audio", None)  # decoding any clip fails
        stored = batches(span)
    assert len(stored) == 51 and stored == cached(span)
    assert {len(wave) // 2 for wave, _ in stored} == {RATE // 2}  # whole clips, not padded to the span
    assert batches(num_samples) == cached(num_samples)
