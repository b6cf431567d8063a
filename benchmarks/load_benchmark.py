"""Load shedding benchmark: 1,000 concurrent /search against one replica on this machine, with /healthz
probed every 100 ms throughout, for the serving app as it was (no gate in Serve's proxy, Serve's queue
in front of 64 ongoing requests per replica, nothing shed) and as it is (the gate in the proxy lets 128
searches through and answers the rest 503 + Retry-After at once; the replica takes up to 1,024 requests
and works on 64, 504 past request_timeout), each in its own local Ray, in the same run on the same
cores; then the gate (rayindex.query.gate): a 100 MB body with a valid token and a 400 MB one without,
both declared but never sent; and /ask at its largest k.

    rayindex build                      # the embedded default, if rayindex-data does not exist yet
    python benchmarks/load_benchmark.py --index rayindex-data [--requests 1000] [--json docs/benchmark-load.json]
    [--png docs/load-benchmark.png]

Each configuration runs in a subprocess with its own local Ray (Serve's proxy reads its gate settings
from the environment when it starts); serves on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers: one free_port

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from helpers import free_port

API_KEY = secrets.token_hex(16)
os.environ["RAYINDEX_API_KEY"] = API_KEY  # before Ray starts: its proxy checks tokens before reading bodies
QUERIES = [
    "read a file line by line",
    "parse a JSON document",
    "compress data with zlib",
    "open a network socket",
    "format a date",
    "sort a list in place",
    "run a subprocess",
    "decode base64 data",
]


async def request(host: str, port: int, raw: bytes) -> int:
    """One HTTP/1.1 request on its own connection, with asyncio streams (a load generator much lighter than
    an HTTP client library, so the 1,000 clients cost the 2 cores little); the status code."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


def probe_health(url: str, stop, out) -> None:
    """/healthz every 100 ms from its own process (its timings are the server's, not the storm client's)."""
    latencies = []
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            t = time.perf_counter()
            client.get("/healthz")
            latencies.append(time.perf_counter() - t)
            stop.wait(0.1)
    out.send(latencies)


async def storm(url: str, n: int) -> dict:
    """n simultaneous searches, and /healthz every 100 ms (another process) until they are all answered."""
    host, port = url.removeprefix("http://").split(":")
    results: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        body = json.dumps({"query": QUERIES[i % len(QUERIES)] + f" {i}", "k": 10}).encode()
        raw = (
            f"POST /search HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: "
            f"application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        t = time.perf_counter()
        try:
            results.append((await request(host, int(port), raw), time.perf_counter() - t))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            results.append((-1, time.perf_counter() - t))

    context = multiprocessing.get_context("spawn")
    stop, (receive, send) = context.Event(), context.Pipe(duplex=False)
    prober = context.Process(target=probe_health, args=(url, stop, send))
    prober.start()
    await asyncio.sleep(1.0)  # the prober is up
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    stop.set()
    health = receive.recv()
    prober.join()
    codes: dict[int, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    ok = [t for c, t in results if c == 200]
    shed = [t for c, t in results if c in (503, 504)]
    return {
        "wall_s": round(wall, 1),
        "codes": codes,
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "shed_p50_ms": pct(shed, 50),
        "shed_p99_ms": pct(shed, 99),
        "max_ms": pct([t for _, t in results], 100),
        "healthz_n": len(health),
        "healthz_p50_ms": pct(health, 50),
        "healthz_p99_ms": pct(health, 99),
        "healthz_max_ms": pct(health, 100),
        "other_5xx": sum(n for c, n in codes.items() if c >= 500 and c not in (503, 504)),
        "latencies_all_ms": [round(t * 1000, 1) for _, t in results],
        "latencies_health_ms": [round(t * 1000, 1) for t in health],
    }


def declared_body(url: str, size: int, token: str | None) -> tuple[str, float]:
    """Status line and seconds of a POST that declares `size` bytes and sends 1 KB of them."""
    host, port = url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        start = time.perf_counter()
        conn.sendall(
            f"POST /search HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: "
            f"{size}\r\n\r\n".encode()
            + b'{"query": "'
            + b"x" * 1000
        )
        status = conn.recv(4096).decode().split("\r\n", 1)[0]
        return status, time.perf_counter() - start


def phase(index: str, requests: int, as_before: bool) -> dict:
    """One configuration in this process, with its own local Ray (the proxy's gate is set per Ray)."""
    from ray import serve

    from rayindex.config import AppConfig, ServeConfig
    from rayindex.query.launch import start_serving
    from rayindex.query.serve import RagService

    if as_before:
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = (
            ""  # no gate: the proxy reads every body, queues every search
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the app as it is, with the key, behind the Python proxy: its gate's shedding is part of what this measures
    start_serving(ServeConfig(index=index, port=port, replica_cpus=0, ingress="python"))
    if as_before:  # as it was: Serve's 64 ongoing requests per replica, an unbounded queue, no shedding
        config = AppConfig(
            index=str(Path(index).resolve()), replica_cpus=0, api_key=API_KEY, max_inflight=10**9, request_timeout=10**6
        )
        serve.run(
            RagService.options(max_ongoing_requests=64, max_queued_requests=-1, ray_actor_options={"num_cpus": 0}).bind(
                config.model_dump()
            ),
            name="rayindex",
            route_prefix="/",
        )
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        for _ in range(4):
            c.post("/search", json={"query": "warm up", "k": 3})
    result = asyncio.run(storm(url, requests))
    if not as_before:
        result["bodies"] = {
            "100 MB body, valid token": declared_body(url, 100_000_000, API_KEY),
            "400 MB body, no token": declared_body(url, 400_000_000, None),
        }
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            t = time.perf_counter()
            result["ask_k20"] = (
                c.post("/ask", json={"question": "How do I decode base64 data?", "k": 20}).status_code,
                time.perf_counter() - t,
            )
    serve.shutdown()
    return result


def main() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 client sockets, and the server's side of them
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="rayindex-data")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--phase", choices=("before", "now"), help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(phase(args.index, args.requests, args.phase == "before")), flush=True)
        return
    results = {}
    for name, which in (("before: Serve queue, no shedding", "before"), ("now: gate + replica shed", "now")):
        out = subprocess.run(
            [sys.executable, __file__, "--phase", which, "--index", args.index, "--requests", str(args.requests)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"the {which} phase failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
        print(name, {k: v for k, v in results[name].items() if not k.startswith("latencies")}, flush=True)

    table = Table(title=f"{args.requests} concurrent /search, one replica, {os.cpu_count()} cores")
    for col in ("", *results):
        table.add_column(col, justify="right")
    before, now = results.values()
    for key in (
        "wall_s",
        "codes",
        "ok_p50_ms",
        "ok_p99_ms",
        "shed_p50_ms",
        "shed_p99_ms",
        "max_ms",
        "healthz_p50_ms",
        "healthz_p99_ms",
        "healthz_max_ms",
        "other_5xx",
    ):
        table.add_row(key, str(before[key]), str(now[key]))
    console = Console(width=140)
    console.print(table)
    console.print(
        f"/healthz p99: {before['healthz_p99_ms'] / now['healthz_p99_ms']:.1f}x lower now; "
        f"slowest response: {before['max_ms'] / now['max_ms']:.1f}x lower"
    )
    for name, (status, seconds) in now["bodies"].items():
        console.print(f"{name}: {status} in {seconds * 1000:.0f} ms")
    console.print(f"/ask with k=20 (the largest allowed): HTTP {now['ask_k20'][0]} in {now['ask_k20'][1]:.2f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "storm": {
                        k: {kk: vv for kk, vv in v.items() if not kk.startswith("latencies")}
                        for k, v in results.items()
                    },
                    "requests": args.requests,
                },
                indent=2,
            )
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, r in results.items():
            answered = r["latencies_all_ms"]
            a.plot(sorted(answered), np.linspace(0, 1, len(answered)), label=name)
            b.plot(sorted(r["latencies_health_ms"]), np.linspace(0, 1, len(r["latencies_health_ms"])), label=name)
        a.set(
            xlabel="ms",
            ylabel="fraction of responses",
            xscale="log",
            title=f"/search responses under {args.requests} concurrent (CDF)",
        )
        b.set(xlabel="ms", ylabel="fraction", xscale="log", title="/healthz latency during the storm (CDF)")
        a.legend(fontsize=7)
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
