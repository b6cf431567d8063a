"""Plain helpers the tests and the benchmarks share (fixtures live in conftest.py): a free loopback port,
the environment of a Ray client subprocess, a Ray head of the tests' own, small corpus files, a build's
settings, an S3 output name, and clients searching a server while something else happens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from rayindex.config import BuildConfig


def stored_vectors(output) -> tuple:
    """Every vector of the build CURRENT names and its vector id, in id order, as its encoders stored them (numpy
    arrays). Imported here when called: see free_port."""
    import numpy as np

    from rayindex.infra.files import load_embeddings
    from rayindex.layout import VECTOR_IDS_FILE, shard_dir
    from rayindex.query.search import open_index

    index = open_index(output)
    manifest = index.manifest
    folders = [shard_dir(index.version_dir, s.shard_id) for s in manifest.shards]
    ids = np.concatenate([np.load(folder / VECTOR_IDS_FILE) for folder in folders])
    vectors = np.concatenate(
        [load_embeddings(f, n, manifest.dimension) for f, n in zip(folders, manifest.shard_counts())]
    )
    order = np.argsort(ids)
    return ids[order], vectors[order]


def free_port() -> int:
    """A free local port. Not rayindex.query.launch.free_port: importing launch imports ray, which reads
    RAY_AUTH_MODE once, and conftest imports this module before it sets that."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeldPort:
    """A port chosen now for a server started later in the session: bound here, not listening, until release(),
    so that nothing else is given it meanwhile (a server bound to port 0, an outgoing connection's local port).
    A CI run failed when SeaweedFS, started minutes after its S3 port was chosen, found it taken and exited 255,
    taking every S3 test with it."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]

    def release(self) -> None:
        """The port is the server's from now on (releasing twice does nothing)."""
        self.socket.close()


def ray_auth_mode() -> str:
    """RAY_AUTH_MODE for this machine as Ray 2.60 has it: "token" when a token exists (Ray turns token auth
    on for a local cluster; a client or driver given an address must be told), else "disabled"."""
    token = (
        os.environ.get("RAY_AUTH_TOKEN")
        or Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser().exists()
    )
    return "token" if token else "disabled"


def client_env() -> dict:
    """The environment of a Ray client run as a subprocess (rayindex, serve, ray CLIs) against the session's
    Ray: token auth as the session has it (ray_auth_mode)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # clients are given --ray-address
    return dict(env, RAY_AUTH_MODE=ray_auth_mode(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@dataclass
class RayHead:
    address: str  # the GCS
    pgid: int
    temp_dir: str
    env: dict


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def stop_head(head: RayHead) -> None:
    """Stop this Ray only: SIGTERM to its process group, SIGKILL to what is left after 5 s, then any process
    of its temp dir that escaped the group. Never `ray stop`, which stops every Ray on the machine."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while group_members(head.pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_members(head.pgid):
            break
    for proc in psutil.process_iter(["cmdline"]):
        if any(head.temp_dir in arg for arg in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@contextlib.contextmanager
def ray_head(*options: str, env: dict | None = None, port: int | None = None, dashboard_port: int | None = None):
    """A Ray head of the tests' own (`ray start --head`), yielding a RayHead: its own GCS port, temp dir
    and process group, and every fixed default port of a head (dashboard 8265, client server 10001,
    dashboard agent 52365) on a free one. ray.init cannot move the agent's port: with a build's local Ray
    beside the suite holding 52365, the session's job agent failed to bind and every `ray job submit`
    got "No available agent to submit job" for 120 s."""
    import ray.util

    ip, port = ray.util.get_node_ip_address(), port or free_port()
    env = env or client_env()
    temp_dir = tempfile.mkdtemp(prefix="rayindex-ray-")  # short: Ray's socket paths live under it
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port or free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        *options,
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        # its own session, so that its process group is this Ray's: the head's processes, the autoscaler's
        # worker nodes and their workers all inherit it
        start = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(address=f"{ip}:{port}", pgid=start.pid, temp_dir=temp_dir, env=env)
    try:
        start.wait(timeout=120)
        assert start.returncode == 0, log_path.read_text()[-3000:]
        yield head
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 50) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def build_args(corpus, output, *options: str) -> list[str]:
    """`rayindex build` of a test corpus as a user types it (the corpora's id column and template), without
    the program: callers put the console script, `python -m rayindex` or a job entrypoint in front."""
    return ["build", str(corpus), "-o", str(output), "--id-column", "id", "--template", "{title}: {body}", *options]


def build_config(inputs, output, **overrides) -> BuildConfig:
    values = dict(
        inputs=[str(i) for i in inputs],
        output=str(output),
        id_column="id",
        template="{title}: {body}",
        shards=3,
        index="IVF8,PQ16np",
        seed=7,
        tune=False,
    )
    values.update(overrides)
    return BuildConfig(**values)


def s3_output(s3_server, name: str) -> str:
    return f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def searches_meanwhile(url: str, payload: dict, clients: int):
    """`clients` threads POSTing payload to <url>/search until the block ends; yields (responses' bodies,
    failures: status codes or errors)."""
    import httpx

    results, failures, stop = [], [], threading.Event()

    def hammer():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/search", json=payload)
                    (results.append(r.json()) if r.status_code == 200 else failures.append(r.status_code))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield results, failures
    finally:
        stop.set()
        for t in threads:
            t.join()


def wait_for_version(client, run_id: str, timeout_s: float = 120) -> None:
    """Until /healthz reports run_id (and a second more, for requests under way to finish)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and client.get("/healthz").json()["version"] != run_id:
        time.sleep(0.2)
    time.sleep(1)


# the session Ray's dashboard (the job server), which test_jobs, test_resume and test_deploy reach
DASHBOARD = HeldPort()
DASHBOARD_PORT = DASHBOARD.port
