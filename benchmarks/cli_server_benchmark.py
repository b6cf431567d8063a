"""`rayindex search --server` against the local `rayindex search`, end to end (issue #23): each search a fresh
process, timed from its start to its exit, as a user at a shell sees it.

    python benchmarks/cli_server_benchmark.py [--index DIR] [--runs 20] [--local-runs 3] \
        [--json docs/benchmark-cli-server.json]

`rayindex serve` runs on the index in a process of its own (its own local Ray, bearer-token auth on); every
search asks for the same k and prints --json. Without --index the embedded default is built first into a
temporary folder (`rayindex build -o DIR`, minutes on 2 cores). Also timed: `python -c pass`, the floor
any command starts from. Each run's CPU time (user + system) is reported beside its wall time: other load on
the machine stretches the wall time, much less the CPU time. For the local runs' queries, the two outputs
are compared (same passages in the same order; the largest score difference). Target: --server p50 <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers: one free_port

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from helpers import free_port

RAYINDEX = str(Path(sys.executable).with_name("rayindex"))
API_KEY = "cli-server-benchmark"
QUERIES = [
    "parse a JSON document",
    "open a file and read its lines",
    "compress data with zlib",
    "decode base64 data",
    "format a date as text",
    "start a thread and wait for it",
    "copy a directory tree",
    "match a regular expression",
    "send an HTTP request",
    "sort a list in place",
]
K = 5


def timed(args: list[str], env: dict) -> tuple[float, float, str]:
    """Seconds from the process' start to its exit, the CPU seconds it used (user + system: what other load on
    the machine changes least), and what it printed; a failure stops the benchmark."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    took, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return took, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, done.stdout


def summary(runs: list[tuple[float, float]]) -> dict:
    times, cpu = [wall for wall, _ in runs], [used for _, used in runs]
    return {
        "runs": len(runs),
        "p50_s": float(np.percentile(times, 50)),
        "p90_s": float(np.percentile(times, 90)),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_p50_s": float(np.percentile(cpu, 50)),
        "times_s": [round(t, 4) for t in times],
    }


def score_difference(printed: str, expected: str) -> float | None:
    """The largest score difference between two --json outputs listing the same passages in the same order,
    None when they list others (a server encodes with its own thread count: the last bits of a dense score
    may differ)."""
    a, b = json.loads(printed), json.loads(expected)
    if [(h["id"], h["passage"], h["text"]) for h in a] != [(h["id"], h["passage"], h["text"]) for h in b]:
        return None
    return max((abs(x["score"] - y["score"]) for x, y in zip(a, b)), default=0.0)


def wait_until_up(url: str, server: subprocess.Popen, log: Path, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"rayindex serve exited ({server.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"rayindex serve did not answer within {limit_s:g} s; see {log}")


def stop(server: subprocess.Popen) -> None:
    """Ctrl-C as a user stops it (Serve shut down, the local Ray with it), then its process group if anything
    is left."""
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait_s)
            os.killpg(server.pid, 0)  # raises when no process of the group is left
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=None, help="a build's output (default: build the embedded default)")
    parser.add_argument("--runs", type=int, default=20, help="searches through the server")
    parser.add_argument("--local-runs", type=int, default=3, help="local searches (each loads the model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAYINDEX_API_KEY=API_KEY)
    env.pop("RAY_ADDRESS", None)  # `rayindex serve` starts a local Ray of its own
    work = Path(tempfile.mkdtemp(prefix="rayindex-cli-server-"))
    index = args.index
    if index is None:
        index = str(work / "index")
        print(f"building the embedded default into {index} ...", file=sys.stderr)
        timed([RAYINDEX, "build", "-o", index, "--quiet"], env)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    server = subprocess.Popen(
        [RAYINDEX, "serve", "--index", index, "--port", str(port), "--ingress", "python"],  # docs/benchmarks.md's
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the local Ray it starts is stopped with it
    )
    try:
        wait_until_up(url, server, log)
        floor = [timed([sys.executable, "-c", "pass"], env)[:2] for _ in range(5)]
        timed([RAYINDEX, "search", "--server", url, QUERIES[0], "-k", str(K), "--json"], env)  # warm-up
        through_server, server_out = [], {}
        for run in range(args.runs):
            query = QUERIES[run % len(QUERIES)]
            took, cpu, server_out[query] = timed(
                [RAYINDEX, "search", "--server", url, query, "-k", str(K), "--json"], env
            )
            through_server.append((took, cpu))
        local, differences = [], []
        for run in range(args.local_runs):
            query = QUERIES[run % len(QUERIES)]
            took, cpu, out = timed([RAYINDEX, "search", "--index", index, query, "-k", str(K), "--json"], env)
            local.append((took, cpu))
            differences.append(score_difference(server_out[query], out))
        health = httpx.get(f"{url}/healthz", timeout=5).json()
    finally:
        stop(server)

    result = {
        "server": summary(through_server),
        "local": summary(local),
        "python_c_pass": summary(floor),
        "local_over_server_p50": summary(local)["p50_s"] / summary(through_server)["p50_s"],
        # the same passages in the same order for the local runs' queries, and the largest score difference
        "same_hits": None not in differences,
        "max_score_difference": max((d for d in differences if d is not None), default=None),
        "target_p50_s": 0.5,
        "k": K,
        "index": {key: health[key] for key in ("version", "documents", "vectors", "index_string")},
        "cores": os.cpu_count(),
        "load_average_1_5_15": os.getloadavg(),  # what else ran: the wall times stretch with it
    }
    table = Table(
        title=f"rayindex search, end to end: {health['documents']:,} docs ({health['index_string']}), k={K}, "
        f"{os.cpu_count()} cores"
    )
    for col in ("command", "runs", "p50 s", "p90 s", "min s", "max s", "CPU p50 s"):
        table.add_column(col, justify="right")
    for name, key in (
        ("search --server URL", "server"),
        ("search --index DIR", "local"),
        ("python -c pass", "python_c_pass"),
    ):
        r = result[key]
        table.add_row(name, str(r["runs"]), *(f"{r[f]:.3f}" for f in ("p50_s", "p90_s", "min_s", "max_s", "cpu_p50_s")))
    Console().print(table)
    print(
        f"local / --server p50: {result['local_over_server_p50']:.1f}x; same hits: {result['same_hits']} (scores "
        f"within {result['max_score_difference']}); "
        f"target --server p50 <= 0.5 s: {'met' if result['server']['p50_s'] <= 0.5 else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
