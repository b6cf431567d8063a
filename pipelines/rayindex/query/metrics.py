"""Serving metrics: each replica records its requests, latency, version and swaps through Ray Serve's
metrics API (Ray metrics tagged with application, deployment and replica, exported by every node's
metrics agent, for Prometheus), and the proxy's gate counts the responses no replica made (gate.py);
/metrics reads every alive node's agent and sums the application's samples over replicas and proxies."""

import math
from typing import NamedTuple

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics as serve_metrics

from rayindex.query.gate import ENDPOINTS, REQUESTS_DOC, REQUESTS_METRIC


class Family(NamedTuple):
    name: str
    kind: str
    doc: str


METRIC_PREFIX = "rayindex_"
REQUESTS = Family(REQUESTS_METRIC, "counter", REQUESTS_DOC)
LATENCY = Family(f"{METRIC_PREFIX}request_latency_seconds", "histogram", "Request latency")
SERVING = Family(f"{METRIC_PREFIX}replicas_serving", "gauge", "Replicas serving each index version")
SWAPS = Family(f"{METRIC_PREFIX}index_swaps", "counter", "Index versions swapped in")
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
METRIC_LABELS = {
    "endpoint",
    "status",
    "version",
    "le",
}  # ours; Serve and Ray add per-replica ones, dropped when summing
# The series /metrics shows at 0 until counted, so that a scrape right after start has them (a Ray counter
# cannot record 0): every endpoint with each status the service answers, and every latency bucket
STATUSES = ("200", "400", "401", "411", "413", "422", "503", "504")


class ReplicaMetrics:
    """This replica's metrics, through Ray Serve's metrics API: Ray metrics tagged with the application,
    deployment and replica, exported by the node's metrics agent, so Prometheus (or /metrics) sums
    them across replicas and nodes."""

    def __init__(self):
        self.requests = serve_metrics.Counter(REQUESTS.name, REQUESTS.doc, tag_keys=("endpoint", "status"))
        self.latency = serve_metrics.Histogram(
            LATENCY.name, LATENCY.doc, boundaries=LATENCY_BUCKETS, tag_keys=("endpoint",)
        )
        self.serving = serve_metrics.Gauge(SERVING.name, SERVING.doc, tag_keys=("version",))
        self.swaps = serve_metrics.Counter(SWAPS.name, SWAPS.doc)


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


def le_label(value: str | float) -> str:
    """A bucket bound as one text whoever wrote it ("1", "1.0" -> "1.0"; inf -> "+Inf")."""
    bound = float(value)
    return "+Inf" if math.isinf(bound) else repr(bound)


def zero_series() -> dict[tuple, float]:
    """{(family, sample, labels): 0.0} for the series /metrics always shows (STATUSES)."""
    series = {(SWAPS.name, f"{SWAPS.name}_total", ()): 0.0}
    for path in (*ENDPOINTS, "other"):
        for status in STATUSES:
            series[(REQUESTS.name, f"{REQUESTS.name}_total", (("endpoint", path), ("status", status)))] = 0.0
        for bound in (*LATENCY_BUCKETS, math.inf):
            series[(LATENCY.name, f"{LATENCY.name}_bucket", (("endpoint", path), ("le", le_label(bound))))] = 0.0
        for suffix in ("_count", "_sum"):
            series[(LATENCY.name, LATENCY.name + suffix, (("endpoint", path),))] = 0.0
    return series


def series_order(key: tuple) -> tuple:
    """Sort key of a series: by family, sample, then labels, a bucket's bound by its number ("2.5" before "10.0")."""
    family, sample, labels = key
    return family, sample, tuple((k, float(v) if k == "le" else 0.0, "" if k == "le" else v) for k, v in labels)


def cluster_metrics(application: str, timeout_s: float = 2.0) -> str:
    """The application's metrics summed over its replicas (and the proxies' counts) on every node, in Prometheus
    text: per-replica and per-process labels are dropped and the samples added up (counters and histogram
    buckets; replicas_serving then counts the replicas on each version); the zero_series are always there."""
    totals = zero_series()
    kinds = {family.name: (family.kind, family.doc) for family in (REQUESTS, LATENCY, SWAPS)}
    for family in agent_metrics(timeout_s):
        name = family.name.removeprefix("ray_")
        kinds[name] = (family.type, family.documentation)
        for sample in family.samples:
            if sample.labels.get("application") != application:
                continue
            labels = tuple(
                sorted((k, le_label(v) if k == "le" else v) for k, v in sample.labels.items() if k in METRIC_LABELS)
            )
            key = (name, sample.name.removeprefix("ray_"), labels)
            totals[key] = totals.get(key, 0.0) + sample.value
    lines = []
    for name, (kind, doc) in sorted(kinds.items()):
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for (family, sample, labels), value in sorted(totals.items(), key=lambda item: series_order(item[0])):
            if family == name:
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{sample}{{{rendered}}} {value}" if rendered else f"{sample} {value}")
    return "\n".join(lines) + "\n"
