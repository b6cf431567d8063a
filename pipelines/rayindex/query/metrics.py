"""Serving metrics: each replica records its requests, latency, version and swaps through Ray Serve's
metrics API (Ray metrics tagged with application, deployment and replica, exported by every node's
metrics agent, for Prometheus); /metrics reads every alive node's agent and sums the application's
samples over its replicas."""

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics as serve_metrics

METRIC_PREFIX = "rayindex_"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
METRIC_LABELS = {
    "endpoint",
    "status",
    "version",
    "le",
}  # ours; Serve and Ray add per-replica ones, dropped when summing


class ReplicaMetrics:
    """This replica's metrics, through Ray Serve's metrics API: Ray metrics tagged with the application,
    deployment and replica, exported by the node's metrics agent, so Prometheus (or /metrics) sums
    them across replicas and nodes."""

    def __init__(self):
        self.requests = serve_metrics.Counter(
            f"{METRIC_PREFIX}requests", "HTTP requests", tag_keys=("endpoint", "status")
        )
        self.latency = serve_metrics.Histogram(
            f"{METRIC_PREFIX}request_latency_seconds",
            "Request latency",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("endpoint",),
        )
        self.serving = serve_metrics.Gauge(
            f"{METRIC_PREFIX}replicas_serving", "Replicas serving each index version", tag_keys=("version",)
        )
        self.swaps = serve_metrics.Counter(f"{METRIC_PREFIX}index_swaps", "Index versions swapped in")


def agent_metrics(timeout_s: float = 2.0) -> list:
    """rayindex's metric families as every alive node's Ray metrics agent exports them (per replica)."""
    families = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        try:
            text = httpx.get(
                f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=timeout_s
            ).text
        except httpx.HTTPError:
            continue  # a node going away: the others still count
        families += [
            f for f in text_string_to_metric_families(text) if f.name.removeprefix("ray_").startswith(METRIC_PREFIX)
        ]
    return families


def cluster_metrics(application: str, timeout_s: float = 2.0) -> str:
    """The application's metrics summed over its replicas on every node, in Prometheus text: per-replica
    and per-process labels are dropped and the samples added up (counters and histogram buckets;
    replicas_serving then counts the replicas on each version)."""
    totals: dict[tuple, float] = {}
    kinds: dict[str, tuple[str, str]] = {}
    for family in agent_metrics(timeout_s):
        name = family.name.removeprefix("ray_")
        kinds[name] = (family.type, family.documentation)
        for sample in family.samples:
            if sample.labels.get("application") != application:
                continue
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in METRIC_LABELS))
            key = (name, sample.name.removeprefix("ray_"), labels)
            totals[key] = totals.get(key, 0.0) + sample.value
    lines = []
    for name, (kind, doc) in sorted(kinds.items()):
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for (family, sample, labels), value in sorted(totals.items()):
            if family == name:
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{sample}{{{rendered}}} {value}" if rendered else f"{sample} {value}")
    return "\n".join(lines) + "\n"
