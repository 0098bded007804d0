"""The Grafana dashboard JSON (infra/grafana/dashboards/fleet.json), checked offline.

* Against Grafana's dashboard JSON schema (vendored from grafana-foundation-sdk, generated from
  Grafana's own CUE kinds: infra/grafana/schema/).
* Fleet's invariants: every panel queries the Prometheus data source variable, filters by the
  model variable where its metric has a model, uses only metrics Fleet exports, and the panels
  the issue asks for are there. tests/integration/test_prometheus_dashboard.py evaluates every
  query against a real Prometheus scraping real workers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "fleet.json"
SCHEMA = ROOT / "infra" / "grafana" / "schema" / "dashboard.jsonschema.json"
RULES = ROOT / "infra" / "prometheus" / "rules" / "fleet.rules.yml"
#: Prometheus names of the metrics Fleet exports (docs/OBSERVABILITY.md), without histogram suffixes.
FLEET_METRICS = {
    "fleet_job_duration_seconds", "fleet_queue_wait_seconds", "fleet_batch_size", "fleet_forward_duration_seconds",
    "fleet_jobs_in_flight", "fleet_queue_depth", "fleet_dead_letters", "fleet_worker_ready", "fleet_training_progress",
    "fleet_training_loss", "fleet_model_accuracy", "process_memory_usage_bytes", "fleet_cuda_memory_allocated_bytes",
    "fleet_cuda_memory_reserved_bytes", "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
}
PROMQL_WORDS = {"sum", "by", "max", "min", "rate", "histogram_quantile", "le", "without", "on", "and", "or",
                "unless", "avg", "count", "offset"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_dashboard_matches_grafanas_dashboard_schema(dashboard):
    errors = sorted(validator().iter_errors(dashboard), key=str)
    assert not errors, [f"{e.message} at {list(e.path)}" for e in errors]


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["panels"][0]["gridPos"].__setitem__("w", "wide"), id="grid-width-text"),
    pytest.param(lambda d: d["panels"][0].pop("type"), id="panel-without-type"),
    pytest.param(lambda d: d.__setitem__("graphTooltip", 7), id="bad-tooltip-mode"),
])
def test_the_schema_is_not_a_rubber_stamp(dashboard, mutate):
    broken = json.loads(json.dumps(dashboard))
    mutate(broken)
    assert list(validator().iter_errors(broken))


def metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', "", expr))
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r"\[[^\]]*\]", "", without_labels)))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"[a-z_]+_name|error_type|ml_\w+|"
                                                                           r"messaging_\w+|fleet_queue_priority|"
                                                                           r"fleet_training_kind|job|instance", w)}


def test_panels_query_fleets_metrics_through_the_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "ml_model_name" in variables["model"]["query"] and variables["model"]["includeAll"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = {re.sub(r"_(bucket|count|sum)$", "", name) for name in metric_names(target["expr"])}
            assert names <= FLEET_METRICS, (panel["title"], names - FLEET_METRICS)
            if "fleet_job_duration" in target["expr"] or "fleet_queue_wait" in target["expr"]:
                assert 'ml_model_name=~"$model"' in target["expr"], panel["title"]


def test_the_panels_the_issue_asks_for(dashboard):
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in dashboard["panels"]}
    wanted = {
        "queue depth": "fleet_queue_depth", "queue wait": "fleet_queue_wait_seconds_bucket",
        "jobs/s": "rate(fleet_job_duration_seconds_count", "errors": 'error_type!=""',
        "latency percentiles": "fleet_job_duration_seconds_bucket", "batch size": "fleet_batch_size",
        "device memory": "fleet_cuda_memory_allocated_bytes", "training progress": "fleet_training_progress",
    }
    for what, needle in wanted.items():
        assert any(needle in expr for expr in exprs.values()), what


def test_alert_rules_use_only_fleets_metrics():
    rules = yaml.safe_load(RULES.read_text())
    recorded = {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = {re.sub(r"_(bucket|count|sum)$", "", name) for name in metric_names(rule["expr"])}
            names -= recorded | {"vector", "scalar", "delta"}
            assert names <= FLEET_METRICS, (rule.get("alert") or rule.get("record"), names - FLEET_METRICS)
