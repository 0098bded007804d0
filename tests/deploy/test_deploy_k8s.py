"""Offline validation of the Kubernetes manifests in infra/k8s.

* Renders every overlay with the real kustomize (pykustomize; infra/k8s/render.py), for the
  shipped registry and for a two-model registry (the per-model manifests generated from it).
* Validates every core resource with kubernetes-validate (the Kubernetes OpenAPI schemas,
  strict: unknown fields are errors) for the oldest and newest supported versions.
* Validates the KEDA ScaledObjects and TriggerAuthentication, and the optional PodMonitor, against
  the CRDs vendored in infra/k8s/schemas/crds (KEDA's and the Prometheus Operator's own generated
  CRDs; unknown fields refused, as `kubectl apply --validate=strict` does).
* Checks the invariants that matter for Fleet: every registry queue is scaled, the trigger
  list names are kombu's priority lists exactly, the drain fits the grace period, HTTP probes,
  disruption budgets, spread, priorities, no service account token, Redis reachable only from
  Fleet pods, ephemeral storage, the trainer not evicted by autoscalers, Flower needs auth, Redis
  never evicts, persists and reads its password from a file, credentials live only in the Secret.

Nothing here needs a cluster, Docker or the network.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.script_modules import load_script, require_test_dependency

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
CRDS = K8S / "schemas" / "crds"
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
KUBE_VERSIONS = ["1.30.0", "latest"]
DRAIN_MARGIN_S = 30



render = load_script("fleet_infra_k8s_render", K8S / "render.py")


def _need_pykustomize() -> None:
    require_test_dependency("pykustomize", "pip install --ignore-requires-python pykustomize==0.1.4")


@pytest.fixture(scope="module")
def two_model_tree(tmp_path_factory) -> Path:
    """A copy of infra/k8s whose registry lists two models, with its models component generated."""
    import shutil

    tree = Path(tmp_path_factory.mktemp("k8s")) / "k8s"
    shutil.copytree(K8S, tree)
    registry = tree / "base" / "registry.toml"
    registry.write_text(registry.read_text() + TWO_MODEL_EXTRA)
    render.generate(registry, tree / render.MODELS_COMPONENT)
    return tree


TWO_MODEL_EXTRA = """
[models.topics]
kind = "classify"
source = "dir:/var/lib/fleet/artifacts/models/topics"
max_batch_size = 16

[deploy.topics]
min_replicas = 0
max_replicas = 3
target_backlog = 32
"""


@pytest.fixture(scope="module", params=[(tree, overlay) for tree in ("shipped", "two-models")
                                        for overlay in sorted(render.OVERLAYS)], ids=lambda p: "-".join(p))
def rendered(request, two_model_tree) -> tuple[str, list[dict[str, Any]]]:
    _need_pykustomize()
    tree, overlay = request.param
    root = K8S if tree == "shipped" else two_model_tree
    return overlay, render.render(root / "overlays" / overlay)


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
        ("PodDisruptionBudget", "fleet-worker-minilm"),
        ("PodDisruptionBudget", "fleet-trainer"),
        ("PriorityClass", "fleet-worker"),
        ("PriorityClass", "fleet-redis"),
        ("NetworkPolicy", "fleet-redis"),
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
        if r["kind"] not in CLUSTER_SCOPED:
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


def _strict(node: Any) -> Any:
    """An OpenAPI v3 schema with unknown properties refused wherever it lists properties and does
    not preserve unknown fields (what the API server's strict field validation enforces)."""
    if isinstance(node, list):
        return [_strict(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: _strict(value) for key, value in node.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


def crd_validator(crd_file: str) -> jsonschema.Draft7Validator:
    """A validator from a vendored CRD's stored version (its openAPIV3Schema)."""
    crd = yaml.safe_load((CRDS / crd_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def assert_valid(validator: jsonschema.Draft7Validator, resource: dict[str, Any]) -> None:
    errors = sorted(validator.iter_errors(resource), key=str)
    assert not errors, [f"{resource['metadata']['name']}: {e.message} at {list(e.path)}" for e in errors]


def test_keda_resources_match_kedas_crds(rendered):
    _, resources = rendered
    scaled = render.find(resources, "ScaledObject")
    auths = render.find(resources, "TriggerAuthentication")
    assert scaled and auths
    for so in scaled:
        assert_valid(crd_validator("keda.sh_scaledobjects.yaml"), so)
    for ta in auths:
        assert_valid(crd_validator("keda.sh_triggerauthentications.yaml"), ta)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda so: so["spec"].__setitem__("minReplicas", 1), id="unknown-field"),
        pytest.param(lambda so: so["spec"]["advanced"]["scalingModifiers"].__setitem__("formulae", "p0"),
                     id="unknown-nested-field"),
        pytest.param(lambda so: so["spec"].__setitem__("maxReplicaCount", "8"), id="string-count"),
        pytest.param(lambda so: so["spec"].pop("scaleTargetRef"), id="no-scale-target"),
        pytest.param(lambda so: so["spec"]["triggers"][0].pop("type"), id="trigger-without-type"),
    ],
)
def test_keda_crd_refuses_broken_scaledobjects(overlays, mutate):
    so = json.loads(json.dumps(render.one(overlays["cpu"], "ScaledObject", "fleet-worker-minilm")))
    mutate(so)
    assert list(crd_validator("keda.sh_scaledobjects.yaml").iter_errors(so))


#: Trigger metadata keys of KEDA's redis and redis-sentinel scalers that Fleet uses (the CRD keeps
#: metadata a free map, so a typo would only show in the scaler's log).
TRIGGER_METADATA = {
    "redis": {"address", "databaseIndex", "listName", "listLength", "activationListLength"},
    "redis-sentinel": {"addresses", "sentinelMaster", "databaseIndex", "listName", "listLength",
                       "activationListLength"},
}


def test_trigger_metadata_is_what_the_scaler_reads(rendered):
    name, resources = rendered
    for so in render.find(resources, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == ("redis-sentinel" if name == "sentinel" else "redis")
            assert set(trigger["metadata"]) == TRIGGER_METADATA[trigger["type"]], trigger
            assert int(trigger["metadata"]["listLength"]) >= 1


def render_with_component(directory: Path, overlay: str, component: str) -> list[dict[str, Any]]:
    """Render ``overlays/<overlay>`` plus ``components/<component>`` (kustomize wants relative paths)."""
    _need_pykustomize()
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, directory)],
        "components": [os.path.relpath(K8S / "components" / component, directory)]}))
    return render.render(directory)


def test_pod_monitor_matches_the_prometheus_operator_crd(tmp_path):
    resources = render_with_component(tmp_path, "cpu", "prometheus-operator")
    (monitor,) = render.find(resources, "PodMonitor")
    assert_valid(crd_validator("monitoring.coreos.com_podmonitors.yaml"), monitor)
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["path"] == "/metrics"
    for dep in fleet_worker_deployments(resources):
        ports = {p["name"] for p in pod_spec(dep)["containers"][0]["ports"]}
        assert endpoint["port"] in ports
        labels = pod_spec_labels(dep)
        assert labels["app.kubernetes.io/name"] in monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    assert "prometheus" in config_value(resources, "OTEL_METRICS_EXPORTER").split(",")


def test_gpu_product_component_pins_gpu_pods_to_a_gfd_label(tmp_path):
    resources = render_with_component(tmp_path, "gpu", "gpu-product")
    for dep in fleet_worker_deployments(resources):
        terms = pod_spec(dep)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (expression,) = terms["nodeSelectorTerms"][0]["matchExpressions"]
        assert expression["key"] == "nvidia.com/gpu.product" and expression["values"]
    assert "affinity" not in pod_spec(render.one(resources, "Deployment", "fleet-flower"))


def test_generated_models_component_is_up_to_date(tmp_path):
    fresh = tmp_path / "models"
    render.generate(K8S / "base" / "registry.toml", fresh)
    shipped = K8S / render.MODELS_COMPONENT
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for path in fresh.iterdir():
        assert path.read_text() == (shipped / path.name).read_text(), (
            f"{path.name} is stale: run `python infra/k8s/render.py generate`")


# ----------------------------------------------------------------------------- KEDA invariants


def test_every_registry_queue_and_the_training_queue_has_a_scaledobject(rendered):
    from producer.contract import TRAINING_QUEUE

    _, resources = rendered
    registry = render.one(resources, "ConfigMap", next(
        cm["metadata"]["name"] for cm in render.find(resources, "ConfigMap") if "registry.toml" in cm.get("data", {})))
    models = {name: dict(table, name=name)
              for name, table in tomllib.loads(registry["data"]["registry.toml"])["models"].items()}
    assert "minilm" in models
    wanted = {queue_of(spec): ("--models", name) for name, spec in models.items()}
    wanted[TRAINING_QUEUE] = ("--train", None)
    scaled = render.find(resources, "ScaledObject")
    for queue, (flag, model) in wanted.items():
        lists = set(kombu_list_names(queue))
        matches = [so for so in scaled if lists <= {t["metadata"]["listName"] for t in so["spec"]["triggers"]}]
        assert len(matches) == 1, f"queue {queue}: {len(matches)} ScaledObjects cover all of its lists"
        target = render.one(resources, "Deployment", matches[0]["spec"]["scaleTargetRef"]["name"])
        args = pod_spec(target)["containers"][0]["args"]
        assert flag in args, (queue, args)
        if model:
            assert model in args[args.index("--models") + 1].split(","), (queue, args)


def kombu_list_names(queue: str) -> list[str]:
    """The Redis list names kombu's Redis transport uses for ``queue``, computed with kombu's own
    ``Channel._q_for_pri`` (no connection): a cross-check of ``producer.queues.priority_lists``."""
    from types import SimpleNamespace

    from kombu.transport.redis import Channel

    from producer.celery_config import PRIORITY_STEPS

    fake = SimpleNamespace(sep=Channel.sep, priority_steps=list(PRIORITY_STEPS))
    fake.priority = lambda n: Channel.priority(fake, n)
    return [Channel._q_for_pri(fake, queue, step) for step in PRIORITY_STEPS]


def test_trigger_list_names_are_kombus_priority_lists(rendered):
    _, resources = rendered
    for so in render.find(resources, "ScaledObject"):
        names = [t["metadata"]["listName"] for t in so["spec"]["triggers"]]
        base = names[0]
        assert "\x06" not in base
        expected = kombu_list_names(base)
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
            if trigger["type"] == "redis":
                assert trigger["metadata"]["address"] == expected_address
            else:
                assert trigger["metadata"]["addresses"] and trigger["metadata"]["sentinelMaster"]
            assert "password" not in trigger["metadata"]
        target = render.one(resources, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "KEDA owns replicas; a fixed count fights the HPA"


def test_training_scales_to_zero_and_inference_keeps_one_warm(rendered):
    overlay, resources = rendered
    assert render.one(resources, "ScaledObject", "fleet-trainer")["spec"]["minReplicaCount"] == 0
    assert render.one(resources, "ScaledObject", "fleet-worker-minilm")["spec"]["minReplicaCount"] >= 1
    topics = render.find(resources, "ScaledObject", "fleet-worker-topics")
    if topics:  # the two-model registry's [deploy.topics] overrides (the GPU overlay caps replicas at its GPUs)
        spec = topics[0]["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 4 if overlay == "gpu" else 3)


# ----------------------------------------------------------------------------- drain and probes


def test_grace_period_covers_the_drain(rendered):
    _, resources = rendered
    deployments = fleet_worker_deployments(resources)
    assert {"fleet-worker-minilm", "fleet-trainer"} <= {d["metadata"]["name"] for d in deployments}
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


def pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_probes_are_http_on_the_probe_port(rendered):
    _, resources = rendered
    probe_port = int(config_value(resources, "FLEET_PROBE_PORT"))
    for dep in fleet_worker_deployments(resources):
        container = pod_spec(dep)["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["probes"] == probe_port, dep["metadata"]["name"]
        for probe, path in (("startupProbe", "/livez"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            assert container[probe]["httpGet"] == {"path": path, "port": "probes"}, (dep["metadata"]["name"], probe)
        # A liveness failure must not come before a worker could have loaded its models.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    for workload in render.find(resources, "Deployment") + render.find(resources, "StatefulSet"):
        for container in pod_spec(workload)["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command", [])
                assert command[:1] != ["fleet"], f"{workload['metadata']['name']}: exec probe {command}"


def test_every_worker_deployment_has_a_disruption_budget_and_spreads(rendered):
    _, resources = rendered
    budgets = render.find(resources, "PodDisruptionBudget")
    for dep in fleet_worker_deployments(resources):
        labels = pod_spec_labels(dep)
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, dep["metadata"]["name"]
        assert matching[0]["spec"].get("maxUnavailable") == 1
        if labels.get("app.kubernetes.io/component") == "inference":
            keys = {c["topologyKey"] for c in pod_spec(dep)["topologySpreadConstraints"]}
            assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
            for constraint in pod_spec(dep)["topologySpreadConstraints"]:
                assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_pods_have_a_priority_class_and_no_service_account_token(rendered):
    _, resources = rendered
    classes = {pc["metadata"]["name"]: pc["value"] for pc in render.find(resources, "PriorityClass")}
    for workload in render.find(resources, "Deployment") + render.find(resources, "StatefulSet"):
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, workload["metadata"]["name"]
        assert spec["priorityClassName"] in classes, workload["metadata"]["name"]
    assert classes["fleet-redis"] > classes["fleet-worker"]


def test_only_fleet_pods_and_keda_reach_redis(rendered):
    _, resources = rendered
    policy = render.one(resources, "NetworkPolicy", "fleet-redis")
    redis = render.one(resources, "StatefulSet", "fleet-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_spec_labels(redis).items()
    (rule,) = policy["spec"]["ingress"]
    selectors = rule["from"]
    fleet_pods = next(s["podSelector"]["matchLabels"] for s in selectors if "podSelector" in s)
    assert fleet_pods == {"app.kubernetes.io/part-of": "fleet"}
    assert any(s.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "keda"}
               for s in selectors)
    for workload in render.find(resources, "Deployment"):
        assert pod_spec_labels(workload)["app.kubernetes.io/part-of"] == "fleet", workload["metadata"]["name"]


def _quantity(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(value[:-2]) * units[value[-2:]] if value[-2:] in units else float(value)


def test_ephemeral_storage_is_requested_for_every_scratch_volume(rendered):
    _, resources = rendered
    for workload in render.find(resources, "Deployment") + render.find(resources, "StatefulSet"):
        spec = pod_spec(workload)
        scratch = sum(_quantity(v["emptyDir"].get("sizeLimit", "0")) for v in spec.get("volumes", [])
                      if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
        container = spec["containers"][0]
        request = _quantity(container["resources"]["requests"]["ephemeral-storage"])
        limit = _quantity(container["resources"]["limits"]["ephemeral-storage"])
        assert request >= scratch and limit >= request, workload["metadata"]["name"]


def test_the_trainer_is_not_evicted_by_autoscalers(rendered):
    _, resources = rendered
    annotations = render.one(resources, "Deployment", "fleet-trainer")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"


def test_workers_report_kubernetes_resource_attributes_from_the_downward_api(rendered):
    _, resources = rendered
    for dep in fleet_worker_deployments(resources):
        env = env_of(pod_spec(dep)["containers"][0])
        attributes = dict(pair.split("=", 1) for pair in env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(","))
        assert attributes["k8s.deployment.name"] == dep["metadata"]["name"]
        for key, field in (("k8s.pod.name", "metadata.name"), ("k8s.namespace.name", "metadata.namespace"),
                           ("k8s.node.name", "spec.nodeName"), ("k8s.pod.uid", "metadata.uid")):
            variable = attributes[key].removeprefix("$(").removesuffix(")")
            assert env[variable]["valueFrom"]["fieldRef"]["fieldPath"] == field
            names = list(env)
            assert names.index(variable) < names.index("OTEL_RESOURCE_ATTRIBUTES"), "$(VAR) needs VAR defined first"


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
    assert not any("pass" in arg for arg in container["args"]), "no password on Redis's command line"
    assert "REDIS_PASSWORD" not in env_of(container)
    acl_dir, acl_file = directives["aclfile"].rsplit("/", 1)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == acl_dir)
    volume = next(v for v in pod_spec(sts)["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "fleet-secrets"
    assert {"key": "users.acl", "path": acl_file} in volume["secret"]["items"]


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
    assert set(data) == {"REDIS_PASSWORD", "REDIS_URL", "FLOWER_BASIC_AUTH", "users.acl"}
    assert f">{data['REDIS_PASSWORD']} " in data["users.acl"] and data["users.acl"].startswith("user default on ")
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
