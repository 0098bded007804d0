"""Offline validation of docker-compose.yml and the observability configs it mounts.

* docker-compose.yml against the Compose Specification JSON schema, as vendored by the
  PyPI package check-jsonschema (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``;
  the same check as ``check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml``).
* Fleet's invariants: Redis persists and never evicts, passwords come from .env, workers
  are health-checked with `fleet health` and stop within a grace that covers the drain,
  the GPU worker reserves one NVIDIA GPU under the `gpu` profile, Flower needs auth,
  every model of the compose registry is served, and the OTel Collector / Prometheus /
  Jaeger configs agree with each other.

No Docker engine is needed (none exists on the CI machine).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DRAIN_MARGIN_S = 30
WORKERS = ("worker-cpu", "worker-gpu", "trainer")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def compose_spec_schema() -> dict:
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        message = "check-jsonschema not installed: pip install check-jsonschema==0.39.0"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def seconds(duration: str) -> float:
    """Compose duration ("1m30s", "150s", "2h") in seconds."""
    total, matched = 0.0, ""
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration):
        total += float(amount) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
        matched += amount + unit
    assert matched == duration, f"not a compose duration: {duration!r}"
    return total


def test_compose_file_matches_the_compose_specification(compose):
    schema = compose_spec_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=str)
    assert not errors, [f"{e.message} at {list(e.path)}" for e in errors]


def test_compose_schema_is_not_a_rubber_stamp(compose):
    schema = compose_spec_schema()
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["restart_policy"] = "always"  # not a Compose key
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_all_services_present(services):
    assert set(services) == {
        "redis", "worker-cpu", "worker-gpu", "trainer", "flower", "otel-collector", "jaeger", "prometheus", "grafana",
    }
    # Everything but the GPU worker starts with a plain `docker compose up -d`.
    assert [name for name, s in services.items() if s.get("profiles")] == ["worker-gpu"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]


def test_redis_persists_never_evicts_and_reads_its_password_from_a_secret_file(compose, services):
    redis = services["redis"]
    assert re.match(r"redis:7(\.|$)", redis["image"])
    assert redis["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = redis["command"]
    server = script[script.index("exec redis-server"):].split()
    flags = dict(zip(server[2::2], server[3::2]))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert flags["--aclfile"] == "/tmp/users.acl" and "requirepass" not in script
    assert "$$(cat /run/secrets/redis_password)" in script, "the ACL file is written from the secret file"
    assert redis["secrets"] == ["redis_password"]
    assert compose["secrets"]["redis_password"] == {"environment": "REDIS_PASSWORD"}
    assert "environment" not in redis, "no password in the Redis container's environment"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]


def test_no_literal_credentials(services):
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|BASIC_AUTH|REDIS_URL|SECRET|TOKEN", key):
                assert "${" in str(value), f"{name}.{key} is a literal credential"
    env_example = (ROOT / "infra" / "compose" / "env.example").read_text()
    assert "REDIS_PASSWORD=" in env_example and "FLOWER_BASIC_AUTH=" in env_example
    assert "GRAFANA_ADMIN_PASSWORD=" in env_example


def test_workers_are_health_checked_and_drain_before_sigkill(services):
    visibility = None
    for name in WORKERS:
        service = services[name]
        assert "http://127.0.0.1:8080/readyz" in service["healthcheck"]["test"][-1], name
        assert service["environment"]["FLEET_PROBE_PORT"] == "8080"
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        env = service["environment"]
        drain = float(env["FLEET_DRAIN_GRACE_S"])
        assert seconds(service["stop_grace_period"]) >= drain + DRAIN_MARGIN_S, name
        visibility = float(env["FLEET_VISIBILITY_TIMEOUT_S"])
        assert visibility > drain, name
        assert env["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
        assert env["REDIS_URL"].endswith("@redis:6379/0")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert env["HF_HUB_OFFLINE"] == "1"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        command = service["command"]
        assert command[0] == "worker" and command.count("--device") == 1


def test_gpu_worker_reserves_one_nvidia_gpu(services):
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = gpu["command"]
    assert command[command.index("--device") + 1] == "cuda:0"
    assert gpu["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    for name in ("worker-cpu", "trainer", "flower"):
        assert services[name]["build"]["dockerfile"] == "infra/docker/Dockerfile"
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert "deploy" not in services[name]


def test_flower_requires_basic_auth_and_stays_on_localhost(services):
    flower = services["flower"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", flower["environment"]["FLOWER_BASIC_AUTH"])
    assert "flower" in flower["command"]
    assert not any("basic" in part for part in flower["command"])
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_every_compose_registry_model_is_served(services):
    registry_file = ROOT / "infra" / "compose" / "registry.toml"
    models = tomllib.loads(registry_file.read_text())["models"]
    try:
        from workers.serving.registry import load_registry
    except ImportError:
        pass
    else:
        assert set(load_registry(registry_file)) == set(models)
    served = set()
    for name in ("worker-cpu", "worker-gpu"):
        command = services[name]["command"]
        served.update(command[command.index("--models") + 1].split(","))
        mounts = services[name]["volumes"]
        assert "./infra/compose/registry.toml:/etc/fleet/registry.toml:ro" in mounts
        assert any(m.startswith("artifacts:") and m.endswith(":ro") for m in mounts)
    assert set(models) <= served
    trainer_mounts = services["trainer"]["volumes"]
    assert "artifacts:/var/lib/fleet/artifacts" in trainer_mounts  # read-write for training


def test_otel_collector_pipelines():
    config = yaml.safe_load((ROOT / "infra" / "otel" / "collector.yaml").read_text())
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert "batch" in config["processors"]
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["receivers"] == ["otlp"]
    assert "batch" in pipelines["traces"]["processors"] and "batch" in pipelines["metrics"]["processors"]
    assert pipelines["traces"]["exporters"] == ["otlp/jaeger"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    # Every component a pipeline names is defined, and each processor list ends with batch.
    for pipeline in pipelines.values():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline[section]:
                assert component in config[section], component
        assert pipeline["processors"][-1] == "batch"
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "${env:JAEGER_OTLP_ENDPOINT}"


def test_kubernetes_collector_config_equals_the_compose_one():
    compose_config = yaml.safe_load((ROOT / "infra" / "otel" / "collector.yaml").read_text())
    k8s_config = yaml.safe_load((ROOT / "infra" / "k8s" / "base" / "otel-collector-config.yaml").read_text())
    assert compose_config == k8s_config


def test_collector_jaeger_and_prometheus_line_up(services):
    config = yaml.safe_load((ROOT / "infra" / "otel" / "collector.yaml").read_text())
    collector = services["otel-collector"]
    assert "./infra/otel/collector.yaml:/etc/otelcol/collector.yaml:ro" in collector["volumes"]
    assert "--config=/etc/otelcol/collector.yaml" in collector["command"]
    jaeger_endpoint = collector["environment"]["JAEGER_OTLP_ENDPOINT"]
    assert jaeger_endpoint == "jaeger:4317"
    # Current releases: Jaeger v2 (OTLP built in), Prometheus v3.
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", services["jaeger"]["image"])
    assert re.fullmatch(r"prom/prometheus:v3\.\d+\.\d+", services["prometheus"]["image"])
    # Resource attributes stay out of series labels (target_info), and stale series expire.
    assert "resource_to_telemetry_conversion" not in config["exporters"]["prometheus"]
    assert config["exporters"]["prometheus"]["metric_expiration"]
    prometheus = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    exporter_port = config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert f"otel-collector:{exporter_port}" in targets
    assert "./infra/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert "./infra/prometheus/rules:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]
    assert prometheus["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_grafana_is_provisioned_with_prometheus_and_the_fleet_dashboard(services):
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    mounts = grafana["volumes"]
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./infra/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    datasources = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    providers = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/fleet.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (ROOT / "infra/grafana/dashboards/fleet.json").exists()
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"])


def test_dockerignore_keeps_the_build_inputs():
    """The Dockerfile COPYs the constraints, pyproject.toml, README.md, producer/, workers/ only."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "deny by default"
    for needed in ("!infra/docker/constraints.txt", "!pyproject.toml", "!README.md", "!producer/", "!workers/"):
        assert needed in patterns
    assert not any(p.startswith("!") and p.rstrip("/") in {".venv", ".git", "tests", ".env"} for p in patterns)
