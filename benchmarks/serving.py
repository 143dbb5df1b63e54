"""After training, measured: scripts/serve.py under a bounded load on loopback with batching on and off, then beside
stalled connections with a SIGTERM at the end, and scripts/export_model.py's parity and latency, all on the models the
benchmark's launchkit runs saved."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import serve_load

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BATCHING = {"on": 32, "off": 1}  # --max-batch of the two server runs
STALLED = 200  # stalled connections beside the clients: as many as in the report that asked for the timeouts


def model_dirs(work: Path) -> dict[str, Path]:
    """The first bf16 launchkit run of the 1 s audio clips and of detection."""
    return {
        "audio": work / "runs" / "s1_launchkit_bf16_0" / "model",
        "detection": work / "runs" / "det_launchkit_bf16_0" / "model",
    }


def request_files(data: dict) -> dict[str, list[Path]]:
    """Validation files of the benchmark data as request bodies: 8 clips, 8 images."""
    clips = sorted((Path(data["s1"]) / "val").rglob("*.wav"))[:8]
    images = sorted((Path(data["det"]).parent / "images" / "val").glob("*.jpg"))[:8]
    return {"audio": clips, "detection": images}


def serving_table(work: Path, data: dict, clients: int, requests: int) -> list[dict]:
    """One server per (task, batching), one bounded load test each, the server's resident memory before and after."""
    rows, files = [], request_files(data)
    for task, model_dir in model_dirs(work).items():
        for batching, max_batch in BATCHING.items():
            server, url = start_server(model_dir, max_batch)
            try:
                before = resident_mb(server.pid)
                result = serve_load.load_test(url, files[task], clients=clients, requests=requests)
                rows.append({"task": task, "batching": batching, "max_batch": max_batch, **result,
                             "rss_mb_before": before, "rss_mb_after": resident_mb(server.pid)})  # fmt: skip
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
            print(f"  serve {task}, batching {batching}: {result['requests_per_second']} requests/s", flush=True)
    rows.append(stalled_clients_row(model_dirs(work)["audio"], files["audio"], clients, requests, work / "serve_stalled.log"))
    return rows


def stalled_clients_row(model_dir: Path, files: list[Path], clients: int, requests: int, log: Path) -> dict:
    """The bounded load beside STALLED connections that send half a head or half a body and then nothing (serve.py's
    default timeouts and connection cap), then SIGTERM while they are still open: the normal requests' latency and
    errors, how the server cut the stalled ones, and how long it took to exit."""
    server, url = start_server(model_dir, BATCHING["on"], log)
    media_type = serve_load.MEDIA_TYPES[files[0].suffix.lower()]
    try:
        with serve_load.Stallers(url, files[0].read_bytes(), media_type, STALLED) as stallers:
            result = serve_load.load_test(url, files, clients=clients, requests=requests)
            signalled = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(timeout=120)
            drain = time.perf_counter() - signalled
    finally:
        if server.poll() is None:
            server.kill()
    text = log.read_text()
    row = {"task": "audio", "batching": "on", "max_batch": BATCHING["on"], **result, **stallers.report(signalled),
           "sigterm_to_exit_s": round(drain, 2), "exit_code": exit_code, "tracebacks": text.count("Traceback")}  # fmt: skip
    print(f"  serve audio beside {STALLED} stalled connections: p99 {row['p99_ms']} ms, exit in {drain:.1f} s", flush=True)
    return row


def start_server(model_dir: Path, max_batch: int, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [PY, str(REPO / "scripts" / "serve.py"), "--model-dir", str(model_dir), "--port", str(port),
           "--max-batch", str(max_batch), "--threads", "1"]  # fmt: skip
    with open(log or os.devnull, "w") as out:
        server = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"{' '.join(cmd)} did not answer /health within 120 s")


def export_table(work: Path) -> dict:
    """export_model.py --format all for each model; its report's parity figures and latency table."""
    out = {}
    for task, model_dir in model_dirs(work).items():
        target = work / "export" / task
        cmd = [PY, str(REPO / "scripts" / "export_model.py"), "--model-dir", str(model_dir), "--format", "all",
               "--output-dir", str(target)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        report = json.loads((target / "export_report.json").read_text())
        out[task] = {"parity": report["parity"], "latency_ms": report["latency"]["milliseconds"], "inputs": report["inputs"]}
        print(f"  export {task}: passed {report['passed']}", flush=True)
    return out


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
