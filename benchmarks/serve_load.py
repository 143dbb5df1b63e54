#!/usr/bin/env python
"""A bounded load test for scripts/serve.py, on loopback only: `clients` connections post files (raw bodies, media
type from the suffix) until `requests` have been sent or `max_seconds` have passed, then report throughput, p50/p99
latency and errors (any answer but 200, or a failed connection, counted by kind).

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --files a.wav b.wav --clients 64 --requests 512 --pid PID

The clients run in `processes` worker processes: measured on 2 busy cores, one Python process of httpx clients
could not send more than about 27 requests/s, so a single one would have measured itself rather than the server.
The workers are spawned, so a script calling load_test() must do so under `if __name__ == "__main__":`.
With --pid, the server's resident memory before and after the run is reported too. With --stalled M, M more
connections (Stallers) send half a request and then nothing for the whole run, and how the server cut them is reported."""

import argparse
import asyncio
import json
import multiprocessing
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

MEDIA_TYPES = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_loopback(url: str):
    if urlsplit(url).hostname not in LOOPBACK:
        raise ValueError(f"{url}: the load test only talks to loopback ({', '.join(LOOPBACK)})")


def load_test(
    url: str, files: list[Path], clients: int = 64, requests: int = 512, processes: int = 4, max_seconds: float = 120
) -> dict:
    require_loopback(url)
    bodies = [(Path(f).read_bytes(), MEDIA_TYPES[Path(f).suffix.lower()]) for f in files]
    processes = min(processes, clients, requests)
    context = multiprocessing.get_context("spawn")  # the caller may hold threads (torch, a server) that fork would copy
    ready, results = context.Barrier(processes + 1), context.Queue()
    shares = zip(split(clients, processes), split(requests, processes), strict=True)
    workers = [
        context.Process(target=_worker, args=(url.rstrip("/") + "/v1/predict", bodies, c, r, max_seconds, ready, results))
        for c, r in shares
    ]
    for worker in workers:
        worker.start()
    ready.wait(timeout=60)  # every worker has imported httpx: the clock starts when they all can send
    start = time.perf_counter()
    outcomes = [results.get(timeout=max_seconds + 60) for _ in workers]
    seconds = time.perf_counter() - start
    for worker in workers:
        worker.join()
    latencies = sorted(t for times, _ in outcomes for t in times)
    errors = sum((kinds for _, kinds in outcomes), Counter())
    return {
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "seconds": round(seconds, 2),
        "requests_per_second": round((len(latencies) - sum(errors.values())) / seconds, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[round(0.99 * (len(latencies) - 1))], 1),
    }


def split(total: int, parts: int) -> list[int]:
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def _worker(url, bodies, clients, requests, max_seconds, ready, results):
    ready.wait(timeout=60)
    results.put(asyncio.run(_send(url, bodies, clients, requests, max_seconds)))


async def _send(url: str, bodies: list[tuple[bytes, str]], clients: int, requests: int, max_seconds: float):
    latencies, errors, sent = [], Counter(), 0
    deadline = time.perf_counter() + max_seconds

    async def client(http: httpx.AsyncClient):
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            content, media_type = bodies[sent % len(bodies)]
            sent += 1
            began = time.perf_counter()
            try:
                status = (await http.post(url, content=content, headers={"content-type": media_type})).status_code
                if status != 200:
                    errors[str(status)] += 1
            except httpx.HTTPError as err:
                errors[type(err).__name__] += 1
            latencies.append(time.perf_counter() - began)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=max_seconds, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, errors


class Stallers:
    """`count` loopback connections that send part of a request and then nothing, as vanished or hostile clients do:
    half stop inside the head, half after the head and half of `body`. One the server closes is replaced at once, so
    `count` stay open while the block runs; each close is recorded (when, after how long, the status answered).
    The connections live in a thread of their own, beside the load test's client processes."""

    MAX = 2000  # connections: enough to pass a server's cap, bounded so the test stays a test

    def __init__(self, url: str, body: bytes, media_type: str, count: int):
        require_loopback(url)
        if not 0 < count <= self.MAX:
            raise ValueError(f"stalled connections: {count}, not 1 to {self.MAX}")
        address = urlsplit(url)
        self.address, self.count = (address.hostname, address.port), count
        head = f"POST /v1/predict HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: {media_type}\r\n"
        self.partials = [head.encode(), f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2]]
        self.opened, self.closed = 0, []  # closed: (perf_counter at the close, seconds held, status or "none")
        self.thread = threading.Thread(target=asyncio.run, args=(self._hold_all(),), daemon=True)

    def __enter__(self) -> "Stallers":
        self.thread.start()
        deadline = time.perf_counter() + 60
        while self.opened < self.count and time.perf_counter() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *_):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=30)

    async def _hold_all(self):
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        holders = [asyncio.create_task(self._hold(self.partials[i % 2])) for i in range(self.count)]
        await self.stop.wait()
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)

    async def _hold(self, partial: bytes):
        while True:
            try:
                reader, writer = await asyncio.open_connection(*self.address)
            except OSError:
                return  # the server no longer listens
            self.opened += 1
            began = time.perf_counter()
            try:
                writer.write(partial)
                answer = await reader.read()  # nothing more is sent: this waits for the server to close
            except OSError:
                answer = b""
            finally:
                writer.close()
            status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
            self.closed.append((time.perf_counter(), time.perf_counter() - began, status))

    def report(self, until: float) -> dict:
        """How the server cut the stalled connections before `until` (a perf_counter time, e.g. its SIGTERM)."""
        cut = [(held, status) for at, held, status in self.closed if at < until]
        return {
            "stalled": self.count,
            "stalled_cut": len(cut),
            "stalled_statuses": dict(Counter(status for _, status in cut)),
            "stalled_held_s": round(statistics.median(held for held, _ in cut), 2) if cut else None,
        }


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise ValueError(f"no VmRSS for process {pid}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--files", nargs="+", type=Path, required=True)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over (default 4)")
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--pid", type=int, default=None, help="the server's process id, to report its resident memory")
    p.add_argument("--stalled", type=int, default=0, help="connections that send half a request, then nothing (default 0)")
    args = p.parse_args()
    before = resident_mb(args.pid) if args.pid else None
    if args.stalled:
        body = args.files[0].read_bytes()
        with Stallers(args.url, body, MEDIA_TYPES[args.files[0].suffix.lower()], args.stalled) as stallers:
            report = load_test(args.url, args.files, args.clients, args.requests, args.processes, args.max_seconds)
        report.update(stallers.report(time.perf_counter()))
    else:
        report = load_test(args.url, args.files, args.clients, args.requests, args.processes, args.max_seconds)
    if args.pid:
        report.update(rss_mb_before=before, rss_mb_after=resident_mb(args.pid))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
