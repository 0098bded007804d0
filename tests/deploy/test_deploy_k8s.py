"""Offline validation of the Kubernetes manifests in infra/k8s.

* Renders both overlays with the real kustomize (pykustomize; infra/k8s/render.py).
* Validates every core resource with kubernetes-validate (the Kubernetes OpenAPI schemas,
  strict: unknown fields are errors) for the oldest and newest supported versions.
* Validates the KEDA ScaledObjects and TriggerAuthentication with the JSON schemas in
  infra/k8s/schemas (written from KEDA's CRD).
* Checks the invariants that matter for Fleet: every registry queue is scaled, the trigger
  list names are kombu's priority lists exactly, the drain fits the grace period, probes
  run `fleet health`, Flower needs auth, Redis never evicts and persists, and credentials
  live only in the Secret.

Nothing here needs a cluster, Docker or the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
KUBE_VERSIONS = ["1.30.0", "latest"]
DRAIN_MARGIN_S = 30


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render = _load("fleet_infra_k8s_render", K8S / "render.py")


def _need_pykustomize() -> None:
    try:
        import pykustomize  # noqa: F401 - only: is it installed?
    except ImportError:
        message = "pykustomize not installed: pip install --ignore-requires-python pykustomize==0.1.4"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module", params=sorted(render.OVERLAYS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    _need_pykustomize()
    return request.param, render.render(render.OVERLAYS[request.param])


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    _need_pykustomize()
    return {name: render.render(path) for name, path in render.OVERLAYS.items()}


# ----------------------------------------------------------------------------- helpers


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def fleet_worker_deployments(resources) -> list[dict[str, Any]]:
    """Deployments whose first container runs `fleet worker` (image entrypoint is fleet)."""
    out = []
    for dep in render.find(resources, "Deployment"):
        container = pod_spec(dep)["containers"][0]
        if not container.get("command") and container.get("args", [])[:1] == ["worker"]:
            out.append(dep)
    return out


def config_value(resources, key: str) -> str:
    for cm in render.find(resources, "ConfigMap"):
        if key in cm.get("data", {}):
            return cm["data"][key]
    raise KeyError(key)


def registry_models() -> dict[str, Any]:
    """The models of the registry the Kubernetes deployment mounts, via Fleet's own loader."""
    path = K8S / "base" / "registry.toml"
    try:
        from workers.serving.registry import load_registry
    except ImportError:  # the loader is optional here; fall back to the documented format
        return {name: dict(table, name=name) for name, table in tomllib.loads(path.read_text())["models"].items()}
    return load_registry(path)


def queue_of(spec: Any) -> str:
    if isinstance(spec, dict):
        from producer.contract import inference_queue

        return inference_queue(spec["kind"], spec["name"])
    return spec.queue


# ----------------------------------------------------------------------------- rendering


def test_both_overlays_render_the_whole_fleet(rendered):
    name, resources = rendered
    kinds = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for expected in [
        ("Namespace", "fleet"),
        ("Secret", "fleet-secrets"),
        ("StatefulSet", "fleet-redis"),
        ("Service", "fleet-redis"),
        ("Deployment", "fleet-worker-minilm"),
        ("Deployment", "fleet-trainer"),
        ("Deployment", "fleet-flower"),
        ("Service", "fleet-flower"),
        ("Deployment", "fleet-otel-collector"),
        ("Service", "fleet-otel-collector"),
        ("PersistentVolumeClaim", "fleet-artifacts"),
        ("TriggerAuthentication", "fleet-redis-auth"),
        ("ScaledObject", "fleet-worker-minilm"),
        ("ScaledObject", "fleet-trainer"),
    ]:
        assert expected in kinds, f"{name} overlay lacks {expected}"
    for r in resources:
        if r["kind"] != "Namespace":
            assert r["metadata"].get("namespace") == "fleet", r["metadata"]["name"]


def test_render_is_real_kustomize_with_generated_configmaps(rendered):
    """configMapGenerator adds a content hash and rewrites the references to it."""
    _, resources = rendered
    names = {cm["metadata"]["name"] for cm in render.find(resources, "ConfigMap")}
    assert any(n.startswith("fleet-config-") for n in names), names
    for dep in render.find(resources, "Deployment"):
        for container in pod_spec(dep)["containers"]:
            for src in container.get("envFrom", []):
                assert src["configMapRef"]["name"] in names
        for volume in pod_spec(dep).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_resources_pass_kubernetes_validate(rendered, kube_version):
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if kube_version == "latest" else kube_version
    _, resources = rendered
    checked = 0
    for resource in resources:
        if resource["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} @ {version}: {exc.message} "
                        f"at {list(exc.path)}")
        checked += 1
    assert checked >= 12


def _validator(schema_file: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_keda_resources_match_keda_schema(rendered):
    _, resources = rendered
    so_validator = _validator("keda-scaledobject.schema.json")
    ta_validator = _validator("keda-triggerauthentication.schema.json")
    scaled = render.find(resources, "ScaledObject")
    auths = render.find(resources, "TriggerAuthentication")
    assert scaled and auths
    for so in scaled:
        errors = sorted(so_validator.iter_errors(so), key=str)
        assert not errors, [f"{e.message} at {list(e.path)}" for e in errors]
    for ta in auths:
        errors = sorted(ta_validator.iter_errors(ta), key=str)
        assert not errors, [f"{e.message} at {list(e.path)}" for e in errors]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda so: so["spec"].__setitem__("minReplicas", 1), id="unknown-field"),
        pytest.param(lambda so: so["spec"]["triggers"][0]["metadata"].__setitem__("listLength", "lots"),
                     id="bad-listLength"),
        pytest.param(lambda so: so["spec"]["triggers"][0]["metadata"].pop("listName"), id="no-listName"),
        pytest.param(lambda so: so["spec"]["triggers"][0]["metadata"].__setitem__("lisName", "x"), id="typo-metadata"),
        pytest.param(lambda so: so["spec"]["advanced"]["scalingModifiers"].pop("target"), id="formula-without-target"),
        pytest.param(lambda so: so["spec"].__setitem__("maxReplicaCount", "8"), id="string-count"),
    ],
)
def test_keda_schema_rejects_broken_scaledobjects(overlays, mutate):
    so = json.loads(json.dumps(render.one(overlays["cpu"], "ScaledObject", "fleet-worker-minilm")))
    mutate(so)
    assert list(_validator("keda-scaledobject.schema.json").iter_errors(so))


# ----------------------------------------------------------------------------- KEDA invariants


def test_every_registry_queue_and_the_training_queue_has_a_scaledobject(rendered):
    from producer.contract import TRAINING_QUEUE

    _, resources = rendered
    models = registry_models()
    assert "minilm" in models
    wanted = {queue_of(spec): ("--models", name) for name, spec in models.items()}
    wanted[TRAINING_QUEUE] = ("--train", None)
    scaled = render.find(resources, "ScaledObject")
    for queue, (flag, model) in wanted.items():
        lists = set(render.kombu_list_names(queue))
        matches = [so for so in scaled if lists <= {t["metadata"]["listName"] for t in so["spec"]["triggers"]}]
        assert len(matches) == 1, f"queue {queue}: {len(matches)} ScaledObjects cover all of its lists"
        target = render.one(resources, "Deployment", matches[0]["spec"]["scaleTargetRef"]["name"])
        args = pod_spec(target)["containers"][0]["args"]
        assert flag in args, (queue, args)
        if model:
            assert model in args[args.index("--models") + 1].split(","), (queue, args)


def test_trigger_list_names_are_kombus_priority_lists(rendered):
    _, resources = rendered
    try:
        from producer.celery_config import PRIORITY_STEPS
    except ImportError:
        PRIORITY_STEPS = render.FLEET_PRIORITY_STEPS  # noqa: N806 - the name of the constant it stands in for
    assert PRIORITY_STEPS == render.FLEET_PRIORITY_STEPS
    for so in render.find(resources, "ScaledObject"):
        names = [t["metadata"]["listName"] for t in so["spec"]["triggers"]]
        base = names[0]
        assert "\x06" not in base
        expected = render.kombu_list_names(base, PRIORITY_STEPS)
        assert names == expected, (so["metadata"]["name"], names, expected)
        # Exactly the lists kombu's _size() adds up, and the separator is kombu's.
        from kombu.transport.redis import Channel

        assert all(n == base or n.startswith(base + Channel.sep) for n in names)


def test_scaling_modifier_sums_every_trigger(rendered):
    _, resources = rendered
    for so in render.find(resources, "ScaledObject"):
        spec = so["spec"]
        triggers = spec["triggers"]
        modifiers = spec["advanced"]["scalingModifiers"]
        terms = [t.strip() for t in modifiers["formula"].split("+")]
        assert sorted(terms) == sorted(t["name"] for t in triggers), modifiers["formula"]
        assert len(set(terms)) == len(terms)
        for trigger in triggers:
            assert trigger["type"] == "redis"
            assert trigger["metadata"]["listLength"] == modifiers["target"]
            assert trigger["metadata"].get("activationListLength", "0") == modifiers["activationTarget"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert float(modifiers["target"]) >= 1


def test_triggers_authenticate_with_the_secret_and_reach_the_redis_service(rendered):
    _, resources = rendered
    auth = render.one(resources, "TriggerAuthentication", "fleet-redis-auth")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"password"}
    secret = render.one(resources, "Secret", refs["password"]["name"])
    assert refs["password"]["key"] in secret["stringData"]
    redis_svc = render.one(resources, "Service", "fleet-redis")
    expected_address = f"{redis_svc['metadata']['name']}.{redis_svc['metadata']['namespace']}.svc:6379"
    for so in render.find(resources, "ScaledObject"):
        assert so["metadata"]["namespace"] == auth["metadata"]["namespace"]
        for trigger in so["spec"]["triggers"]:
            assert trigger["authenticationRef"]["name"] == "fleet-redis-auth"
            assert trigger["metadata"]["address"] == expected_address
            assert "password" not in trigger["metadata"]
        target = render.one(resources, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "KEDA owns replicas; a fixed count fights the HPA"


def test_training_scales_to_zero_and_inference_keeps_one_warm(rendered):
    _, resources = rendered
    assert render.one(resources, "ScaledObject", "fleet-trainer")["spec"]["minReplicaCount"] == 0
    assert render.one(resources, "ScaledObject", "fleet-worker-minilm")["spec"]["minReplicaCount"] >= 1


# ----------------------------------------------------------------------------- drain and probes


def test_grace_period_covers_the_drain(rendered):
    _, resources = rendered
    deployments = fleet_worker_deployments(resources)
    assert {d["metadata"]["name"] for d in deployments} == {"fleet-worker-minilm", "fleet-trainer"}
    visibility = float(config_value(resources, "FLEET_VISIBILITY_TIMEOUT_S"))
    for dep in deployments:
        spec = pod_spec(dep)
        container = spec["containers"][0]
        drain = float(env_of(container)["FLEET_DRAIN_GRACE_S"]["value"])
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= drain + DRAIN_MARGIN_S, (dep["metadata"]["name"], grace, drain)
        assert visibility > drain, "a job longer than the visibility timeout would run twice"
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        script = pre_stop[-1]
        assert "kill -TERM 1" in script and "while kill -0 1" in script, script
        assert "sleep" not in script.replace("do sleep 1", ""), "a sleeping preStop keeps the worker consuming"


def test_probes_run_fleet_health(rendered):
    _, resources = rendered
    for dep in fleet_worker_deployments(resources):
        container = pod_spec(dep)["containers"][0]
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"] == ["fleet", "health"], (dep["metadata"]["name"], probe)
        # Liveness must keep passing while a terminating pod drains (kubernetes#107473).
        assert container["livenessProbe"]["exec"]["command"] == ["fleet", "health", "--live"]
        # A liveness failure must not come before a worker could have loaded its models.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_one_worker_per_pod(rendered):
    _, resources = rendered
    for dep in fleet_worker_deployments(resources):
        containers = pod_spec(dep)["containers"]
        assert len(containers) == 1
        args = containers[0]["args"]
        assert args.count("--device") == 1


def test_gpu_overlay_gives_each_worker_exactly_one_gpu(overlays):
    for dep in fleet_worker_deployments(overlays["gpu"]):
        spec = pod_spec(dep)
        container = spec["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1, dep["metadata"]["name"]
        args = container["args"]
        assert args[args.index("--device") + 1] == "cuda:0"
        assert container["image"].endswith("-cuda")
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    flower = render.one(overlays["gpu"], "Deployment", "fleet-flower")
    assert pod_spec(flower)["containers"][0]["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in json.dumps(flower)


def test_cpu_overlay_requests_no_gpu(overlays):
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(overlays["cpu"])
    for dep in fleet_worker_deployments(overlays["cpu"]):
        args = pod_spec(dep)["containers"][0]["args"]
        assert args[args.index("--device") + 1] == "cpu"


# ----------------------------------------------------------------------------- Flower, Redis, secrets


def test_flower_requires_basic_auth_from_the_secret(rendered):
    _, resources = rendered
    flower = render.one(resources, "Deployment", "fleet-flower")
    container = pod_spec(flower)["containers"][0]
    auth = env_of(container)["FLOWER_BASIC_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "fleet-secrets", "key": "FLOWER_BASIC_AUTH"}
    assert not any("basic" in a for a in container.get("args", [])), "no credentials on the command line"
    assert "flower" in container["args"]
    service = render.one(resources, "Service", "fleet-flower")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    secret = render.one(resources, "Secret", "fleet-secrets")
    user, _, password = secret["stringData"]["FLOWER_BASIC_AUTH"].partition(":")
    assert user and password


def test_redis_is_durable_never_evicts_and_needs_a_password(rendered):
    _, resources = rendered
    sts = render.one(resources, "StatefulSet", "fleet-redis")
    container = pod_spec(sts)["containers"][0]
    assert re.match(r"redis:7(\.|$)", container["image"]), container["image"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    conf_volume = next(v for v in pod_spec(sts)["volumes"] if v["name"] == "config")
    conf = render.one(resources, "ConfigMap", conf_volume["configMap"]["name"])["data"]["redis.conf"]
    directives = {line.split()[0]: line.split(None, 1)[1]
                  for line in conf.splitlines() if line.strip() and not line.startswith("#")}
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction"
    assert directives["dir"] == "/data"
    assert "requirepass" not in directives, "the password belongs in the Secret"
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "fleet-secrets"


SECRETISH_KEY = re.compile(r"pass(word)?|secret|token|credential|basic_auth|api_key|REDIS_URL", re.I)
CREDENTIAL_URL = re.compile(r"\w+://[^/\s:@]*:[^/\s@]+@")


def test_no_credentials_outside_the_secret(rendered):
    _, resources = rendered
    for cm in render.find(resources, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not SECRETISH_KEY.search(key), f"ConfigMap {cm['metadata']['name']} has key {key}"
            assert not CREDENTIAL_URL.search(value), (
                f"ConfigMap {cm['metadata']['name']}/{key} holds a URL with credentials")
            assert not re.search(r"^\s*requirepass\s", value, re.M), f"ConfigMap {cm['metadata']['name']}/{key}"
    for workload in render.find(resources, "Deployment") + render.find(resources, "StatefulSet"):
        for container in pod_spec(workload)["containers"]:
            for name, entry in env_of(container).items():
                if SECRETISH_KEY.search(name) or name == "REDISCLI_AUTH":
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (workload["metadata"]["name"], name)


def test_secret_is_a_marked_placeholder_with_a_consistent_redis_url(rendered):
    _, resources = rendered
    secret = render.one(resources, "Secret", "fleet-secrets")
    data = secret["stringData"]
    assert set(data) == {"REDIS_PASSWORD", "REDIS_URL", "FLOWER_BASIC_AUTH"}
    assert all("CHANGE-ME" in value for value in data.values())
    assert secret["metadata"]["annotations"]["fleet.dev/placeholder"].startswith("true")
    url = urllib.parse.urlsplit(data["REDIS_URL"])
    assert urllib.parse.unquote(url.password) == data["REDIS_PASSWORD"]
    assert url.hostname == "fleet-redis" and url.port == 6379


def test_workers_read_redis_url_and_registry_from_the_right_places(rendered):
    _, resources = rendered
    registry_path = config_value(resources, "FLEET_MODEL_REGISTRY")
    artifact_dir = config_value(resources, "FLEET_ARTIFACT_DIR")
    assert config_value(resources, "HF_HUB_OFFLINE") == "1"
    collector = render.one(resources, "Service", "fleet-otel-collector")
    assert config_value(resources, "OTEL_EXPORTER_OTLP_ENDPOINT") == f"http://{collector['metadata']['name']}:4317"
    for dep in fleet_worker_deployments(resources):
        spec = pod_spec(dep)
        container = spec["containers"][0]
        assert env_of(container)["REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_URL"
        assert env_of(container)["OTEL_SERVICE_NAME"]["value"].startswith("fleet-")
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert str(Path(registry_path).parent) in mounts
        volumes = {v["name"]: v for v in spec["volumes"]}
        registry_volume = volumes[mounts[str(Path(registry_path).parent)]["name"]]
        cm = render.one(resources, "ConfigMap", registry_volume["configMap"]["name"])
        assert Path(registry_path).name in cm["data"]
        artifacts = mounts[artifact_dir]
        claim = volumes[artifacts["name"]]["persistentVolumeClaim"]["claimName"]
        render.one(resources, "PersistentVolumeClaim", claim)
        training = "--train" in container["args"]
        assert artifacts.get("readOnly", False) is (not training), dep["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_mounted_registry_is_the_shipped_file():
    # The ConfigMap is generated from infra/k8s/base/registry.toml: it must load with
    # Fleet's own registry parser (when the workers package is importable).
    models = registry_models()
    for name, spec in models.items():
        source = spec["source"] if isinstance(spec, dict) else spec.source
        assert source.startswith(("package:", "dir:/")), (name, source)


def test_otel_collector_is_wired(rendered):
    _, resources = rendered
    dep = render.one(resources, "Deployment", "fleet-otel-collector")
    container = pod_spec(dep)["containers"][0]
    volume = next(v for v in pod_spec(dep)["volumes"] if v["name"] == "config")
    cm = render.one(resources, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(cm["data"]["collector.yaml"])
    assert "--config=/etc/otelcol/collector.yaml" in container["args"]
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    service_ports = {p["port"] for p in render.one(resources, "Service", "fleet-otel-collector")["spec"]["ports"]}
    assert {4317, 4318, 8889} <= service_ports
