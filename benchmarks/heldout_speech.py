"""Spoken commands with unseen speakers in the test split: the audio comparison's data.

Ten words (yes, no, up, down, left, right, on, off, stop, go) spoken by espeak-ng (Debian's package
espeak-ng; the bench installs it when missing). A speaker is an accent, a voice variant, a pitch and a speed.
Training and validation speakers use three accents and half of the voice variants; test speakers use four
other accents and the other variants, so the test measures generalisation to new voices. Each clip is one
second at 22.05 kHz (espeak's rate, so both pipelines resample), the word at a random offset and loudness
over background noise at a random level. Layout: class folders, DIR/{train,val,test}/<word>/*.wav."""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SEEN_ACCENTS = ["en-us", "en-gb", "en-gb-x-rp"]
UNSEEN_ACCENTS = ["en-gb-scotland", "en-029", "en-gb-x-gbcwmd", "en-gb-x-gbclan"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
            "croak", "adam", "Andy", "Annie", "aunty", "boris", "david", "ed", "Gene", "john", "linda", "max", "paul",
            "robert", "steph", "travis", "zac", "grandma", "grandpa", "norbert"]  # fmt: skip
RATE = 22050


def require_espeak() -> str:
    if shutil.which("espeak-ng") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "espeak-ng"], check=True, capture_output=True)
    return shutil.which("espeak-ng")


def speakers(rng, count: int, accents: list[str], variants: list[str]) -> list[list[str]]:
    """espeak-ng arguments for `count` distinct speakers."""
    return [
        ["-v", f"{accents[i % len(accents)]}+{variants[rng.integers(len(variants))]}",
         "-p", str(rng.integers(20, 80)), "-s", str(rng.integers(120, 200))]
        for i in range(count)
    ]  # fmt: skip


def write_speech_set(root: Path, *, train_speakers: int, test_speakers: int, takes: int, seed: int = 0) -> Path:
    """train/ and val/ from the seen speakers (takes-1 and 1 takes of each word), test/ from unseen ones."""
    settings = f"speech v1 {train_speakers} {test_speakers} {takes} {seed}"
    done = root / ".complete"
    if done.exists() and done.read_text() == settings:
        return root
    shutil.rmtree(root, ignore_errors=True)
    espeak = require_espeak()
    rng = np.random.default_rng(seed)
    order = rng.permutation(VARIANTS)
    seen = speakers(rng, train_speakers, SEEN_ACCENTS, list(order[: len(order) // 2]))
    unseen = speakers(rng, test_speakers, UNSEEN_ACCENTS, list(order[len(order) // 2 :]))
    jobs = []
    for group, voices in (("seen", seen), ("unseen", unseen)):
        for s, voice in enumerate(voices):
            for word in WORDS:
                for take in range(takes):
                    split = "test" if group == "unseen" else "val" if take == takes - 1 else "train"
                    path = root / split / word / f"{group}{s:03d}_{take}.wav"
                    jobs.append((voice, word, path, int(rng.integers(2**31))))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: write_clip(espeak, *job), jobs))
    done.write_text(settings)
    return root


def write_clip(espeak: str, voice: list[str], word: str, path: Path, seed: int):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw.wav")
    subprocess.run([espeak, *voice, "-w", str(raw), word], check=True)
    speech, rate = sf.read(raw, dtype="float32")
    raw.unlink()
    loud = np.flatnonzero(np.abs(speech) > 1e-3)  # espeak pads the word with silence: keep the word only
    speech = speech[loud[0] : loud[-1] + 1][:RATE] if len(loud) else speech[:RATE]
    clip = np.zeros(RATE, np.float32)
    start = int(rng.integers(0, RATE - len(speech) + 1))
    clip[start : start + len(speech)] = speech * rng.uniform(0.3, 1.0)
    noise = rng.normal(0, 1, RATE).astype(np.float32)
    noise = np.convolve(noise, np.ones(8) / 8, mode="same") if rng.random() < 0.5 else noise  # some of it low-passed
    clip += noise * rng.uniform(0.005, 0.05)
    sf.write(path, np.clip(clip, -1, 1), RATE, subtype="PCM_16")
