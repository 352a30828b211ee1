"""The Kubernetes manifests (deploy/kubernetes), rendered and validated offline.

There is no cluster and no ``kubectl`` in CI. These tests render the kustomize base and the
example overlay with a small renderer of the kustomize features the manifests use (it
refuses any other, so a manifest cannot rely on something it ignores), then:

- validate every core resource against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` package ships (strict: an unknown field fails);
- validate every KEDA resource against the CRD committed in deploy/kubernetes/schemas
  (its openAPIV3Schema with ``jsonschema``, unknown fields rejected as ``kubectl
  --validate=strict`` does);
- check the manifests against Hutch itself: each ``hutch`` command parses with the CLI's
  own parser, the config loads with the real settings loader, the probes point at ports
  and paths the processes really serve, the worker's grace period covers
  ``shutdown_grace_s``, selectors match, the KEDA regex covers exactly the pools' queues
  (from :class:`~pipeline.broker.names.Names`), the Prometheus query uses exported metrics;
- and show that a broken manifest fails (mutated resources).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from pipeline.broker.names import Names
from pipeline.cli.main import build_parser
from pipeline.gateway.app import Gateway
from pipeline.observe.metrics import Metrics
from pipeline.observe.probes import LoopHeartbeat
from pipeline.scheduling.lanes import LaneMap
from pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAY = KUBE / "overlays" / "example"
SCHEMAS = KUBE / "schemas"
#: The Kubernetes version the core resources are validated against (a schema the
#: kubernetes-validate package ships, so no network is needed).
K8S_VERSION = "1.30.0"
#: API groups whose patches kustomize applies as strategic merge patches (lists of named
#: items merge by name); any other kind (a CRD) gets an RFC 7386 JSON merge patch.
_STRATEGIC = {"v1", "apps/v1", "batch/v1", "policy/v1"}
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "labels", "images",
                       "replicas", "configMapGenerator", "patches"}
CONFIG_MOUNT = "/etc/hutch/hutch.toml"

Resource = dict[str, Any]


# -- a small kustomize --------------------------------------------------------------------

def render(directory: Path) -> list[Resource]:
    """What ``kustomize build directory`` gives for the features the manifests use:
    generated ConfigMaps get a hash of their content in their name, and the pods that
    mount them follow."""
    resources = _build(directory)
    renamed: dict[str, str] = {}
    for res in resources:
        if res.pop("_generated", False):
            digest = hashlib.sha256(yaml.safe_dump(res["data"]).encode()).hexdigest()[:10]
            old = res["metadata"]["name"]
            renamed[old] = res["metadata"]["name"] = f"{old}-{digest}"
    for pod in _pod_specs(resources):
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = renamed.get(volume["configMap"]["name"],
                                                          volume["configMap"]["name"])
    return resources


def _build(directory: Path) -> list[Resource]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization fields the test renderer lacks: {unknown}"
    resources: list[Resource] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += _build(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kust.get("configMapGenerator", []):
        _generate(directory, generator, resources)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only patches by path: {patch}"
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            target = _find(resources, doc["kind"], doc["metadata"]["name"])
            merged = _merge(target, doc, doc["apiVersion"] in _STRATEGIC)
            target.clear()
            target.update(merged)
    _transform(kust, resources)
    return resources


def _generate(directory: Path, generator: dict[str, Any], resources: list[Resource]) -> None:
    assert set(generator) <= {"name", "files", "literals", "behavior", "options"}, generator
    options = generator.get("options", {})
    assert set(options) <= {"labels"}, options
    data = {Path(f).name: (directory / f).read_text() for f in generator.get("files", [])}
    data.update(dict(item.split("=", 1) for item in generator.get("literals", [])))
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "_generated": True,
                          "metadata": {"name": generator["name"],
                                       "labels": dict(options.get("labels", {}))},
                          "data": data})
        return
    existing = _find(resources, "ConfigMap", generator["name"])
    assert existing.get("_generated"), f"{generator['name']}: {behavior} of a non-generated map"
    existing["data"] = data if behavior == "replace" else {**existing["data"], **data}
    existing["metadata"]["labels"].update(options.get("labels", {}))


def _transform(kust: dict[str, Any], resources: list[Resource]) -> None:
    """namespace, labels, images and replicas, over everything built so far."""
    for res in resources:
        if "namespace" in kust and res["kind"] != "Namespace":
            res["metadata"]["namespace"] = kust["namespace"]
        for label in kust.get("labels", []):
            assert not label.get("includeSelectors"), "selectors are the manifests' own"
            res["metadata"].setdefault("labels", {}).update(label["pairs"])
            template = res.get("spec", {}).get("template")
            if label.get("includeTemplates") and template is not None:
                template.setdefault("metadata", {}).setdefault("labels", {}).update(
                    label["pairs"])
    for image in kust.get("images", []):
        for pod in _pod_specs(resources):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                if re.split(r"[:@]", container["image"])[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:" \
                                         f"{image['newTag']}"
    for replicas in kust.get("replicas", []):
        _find(resources, "Deployment", replicas["name"])["spec"]["replicas"] = replicas["count"]


def _merge(target: Any, patch: Any, strategic: bool) -> Any:
    """A strategic merge patch (named list items merge) or a JSON merge patch."""
    if not isinstance(target, dict) or not isinstance(patch, dict):
        if strategic and isinstance(target, list) and isinstance(patch, list) and all(
                isinstance(item, dict) and "name" in item for item in target + patch):
            merged = [copy.deepcopy(item) for item in target]
            for item in patch:
                same = [i for i, old in enumerate(merged) if old["name"] == item["name"]]
                if same:
                    merged[same[0]] = _merge(merged[same[0]], item, strategic)
                else:
                    merged.append(copy.deepcopy(item))
            return merged
        return copy.deepcopy(patch)
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out[key], value, strategic) if key in out else copy.deepcopy(value)
    return out


def _find(resources: list[Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_specs(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for res in resources:
        template = res.get("spec", {}).get("template")
        if res["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"} and template:
            yield template["spec"]


# -- validation ---------------------------------------------------------------------------

def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema, unknown fields forbidden."""
    schemas = {}
    for path in SCHEMAS.glob("keda.sh_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api, crd["spec"]["names"]["kind"])] = _closed(
                version["schema"]["openAPIV3Schema"])
    return schemas


def _closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it lists properties and
    does not keep unknown fields: what the API server's strict field validation rejects."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _closed(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


CRDS = _crd_schemas()
#: Per trigger type, a schema of its metadata (the CRD allows any map of strings).
TRIGGER_METADATA = {kind: schema for kind, schema in json.loads(
    (SCHEMAS / "keda-trigger-metadata.json").read_text()).items() if kind != "$comment"}


def validate(resource: Resource) -> None:
    """Raise if ``resource`` is not valid: KEDA kinds by their CRD, the rest by the
    Kubernetes schemas (a kind neither knows fails too)."""
    key = (resource["apiVersion"], resource["kind"])
    if key in CRDS:
        jsonschema.validate(resource, CRDS[key])
        for trigger in resource["spec"].get("triggers", []):
            if trigger["type"] not in TRIGGER_METADATA:
                raise jsonschema.ValidationError(f"no metadata schema for {trigger['type']}")
            jsonschema.validate(trigger["metadata"], TRIGGER_METADATA[trigger["type"]])
        return
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


RENDERED = {"base": render(BASE), "overlay": render(OVERLAY)}


@pytest.fixture(params=sorted(RENDERED))
def rendered(request: pytest.FixtureRequest) -> list[Resource]:
    return copy.deepcopy(RENDERED[request.param])


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def test_the_renderer_renders_what_the_overlay_says() -> None:
    """The renderer is itself checked: the overlay's namespace, image, replicas, config
    and patches land where kustomize puts them."""
    base, overlay = RENDERED["base"], RENDERED["overlay"]
    assert len(overlay) == len(base) + 1  # the Namespace
    assert all(r["metadata"].get("namespace") == "hutch" for r in overlay
               if r["kind"] != "Namespace")
    images = {c["image"] for pod in _pod_specs(overlay) for c in pod["containers"]}
    assert images == {"registry.example.com/hutch:0.1.0"}
    assert _find(overlay, "Deployment", "hutch-gateway")["spec"]["replicas"] == 3
    assert _find(base, "Deployment", "hutch-gateway")["spec"]["replicas"] == 2
    [base_map], [overlay_map] = of_kind(base, "ConfigMap"), of_kind(overlay, "ConfigMap")
    assert base_map["metadata"]["name"] != overlay_map["metadata"]["name"]  # the hash
    assert "batch" in overlay_map["data"]["hutch.toml"]
    mock = _find(overlay, "Deployment", "hutch-mock-backend")["spec"]["template"]["spec"]
    assert "24" in mock["containers"][0]["args"] and mock["containers"][0]["readinessProbe"]
    assert _find(overlay, "ScaledObject", "hutch-worker")["spec"]["maxReplicaCount"] == 5
    assert {c["name"] for pod in _pod_specs(overlay) for c in pod["containers"]} == {
        "worker", "gateway", "mock-backend", "topology"}


def test_every_resource_validates(rendered: list[Resource]) -> None:
    kinds = {r["kind"] for r in rendered}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Job", "PodDisruptionBudget",
            "ScaledObject", "TriggerAuthentication"} <= kinds
    for resource in rendered:
        try:
            validate(resource)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError,
                kubernetes_validate.SchemaNotFoundError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {first}")


def _deployment(resources: list[Resource], name: str) -> Resource:
    return _find(resources, "Deployment", f"hutch-{name}")


def _container(resources: list[Resource], name: str) -> dict[str, Any]:
    pod = _deployment(resources, name)["spec"]["template"]["spec"]
    return cast(dict[str, Any], pod["containers"][0])


def _so_trigger(resources: list[Resource], name: str) -> dict[str, Any]:
    return cast(dict[str, Any], _find(resources, "ScaledObject", name)["spec"]["triggers"][0])


MUTATIONS: dict[str, Callable[[list[Resource]], Resource]] = {}


def mutation(func: Callable[[list[Resource]], Resource]) -> Callable[[list[Resource]], Resource]:
    MUTATIONS[func.__name__] = func
    return func


@mutation
def port_not_a_number(resources: list[Resource]) -> Resource:
    _container(resources, "worker")["ports"][0]["containerPort"] = "nine-one-hundred"
    return _deployment(resources, "worker")


@mutation
def misspelt_field(resources: list[Resource]) -> Resource:
    worker = _deployment(resources, "worker")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    return worker


@mutation
def probe_without_handler(resources: list[Resource]) -> Resource:
    _container(resources, "gateway")["readinessProbe"]["httpGet"].pop("port")
    return _deployment(resources, "gateway")


@mutation
def pdb_with_a_string_budget_type(resources: list[Resource]) -> Resource:
    pdb = _find(resources, "PodDisruptionBudget", "hutch-worker")
    pdb["spec"]["selector"] = "app.kubernetes.io/component=worker"
    return pdb


@mutation
def scaledobject_replicas_as_text(resources: list[Resource]) -> Resource:
    scaled = _find(resources, "ScaledObject", "hutch-worker")
    scaled["spec"]["maxReplicaCount"] = "four"
    return scaled


@mutation
def scaledobject_misspelt_field(resources: list[Resource]) -> Resource:
    scaled = _find(resources, "ScaledObject", "hutch-worker")
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    return scaled


@mutation
def trigger_without_type(resources: list[Resource]) -> Resource:
    _so_trigger(resources, "hutch-worker").pop("type")
    return _find(resources, "ScaledObject", "hutch-worker")


@mutation
def trigger_metadata_not_text(resources: list[Resource]) -> Resource:
    _so_trigger(resources, "hutch-mock-backend")["metadata"]["threshold"] = 16
    return _find(resources, "ScaledObject", "hutch-mock-backend")


@mutation
def trigger_metadata_misspelt_key(resources: list[Resource]) -> Resource:
    meta = _so_trigger(resources, "hutch-worker")["metadata"]
    meta["queuename"] = meta.pop("queueName")
    return _find(resources, "ScaledObject", "hutch-worker")


@mutation
def trigger_regex_without_http(resources: list[Resource]) -> Resource:
    _so_trigger(resources, "hutch-worker")["metadata"]["protocol"] = "amqp"
    return _find(resources, "ScaledObject", "hutch-worker")


@mutation
def triggerauthentication_without_key(resources: list[Resource]) -> Resource:
    auth = _find(resources, "TriggerAuthentication", "hutch-rabbitmq-management")
    auth["spec"]["secretTargetRef"][0].pop("key")
    return auth


@mutation
def unknown_kind(resources: list[Resource]) -> Resource:
    job = _find(resources, "Job", "hutch-topology")
    job["kind"] = "Jobb"
    return job


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_broken_manifest_fails(name: str) -> None:
    """Each mutation breaks one resource that validates as committed: validation fails."""
    resources = copy.deepcopy(RENDERED["overlay"])
    broken = MUTATIONS[name](resources)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError,
                        kubernetes_validate.SchemaNotFoundError)):
        validate(broken)


# -- the manifests against Hutch ----------------------------------------------------------

def _settings(resources: list[Resource], tmp_path: Path) -> Settings:
    [config_map] = of_kind(resources, "ConfigMap")
    path = tmp_path / "hutch.toml"
    path.write_text(config_map["data"]["hutch.toml"])
    return load_settings(path)


def _args(resources: list[Resource], name: str) -> Any:
    argv = _container(resources, name)["args"]
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{name}: `hutch {shlex.join(argv)}` does not parse (exit {exc.code})")


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def _probe_paths(container: dict[str, Any]) -> set[tuple[str, str]]:
    return {(probe["httpGet"]["port"], probe["httpGet"]["path"])
            for key in ("startupProbe", "livenessProbe", "readinessProbe")
            if (probe := container.get(key))}


def test_commands_config_and_mounts_are_hutch_s_own(rendered: list[Resource],
                                                    tmp_path: Path) -> None:
    """Every hutch command parses, names the mounted config, and the config loads."""
    settings = _settings(rendered, tmp_path)
    [config_map] = of_kind(rendered, "ConfigMap")
    [secret] = of_kind(rendered, "Secret")
    for pod in _pod_specs(rendered):
        container = pod["containers"][0]
        args = build_parser().parse_args(container["args"])
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if getattr(args, "config", None):
            assert args.config == CONFIG_MOUNT
            [(volume, path)] = mounts.items()
            assert CONFIG_MOUNT == f"{path}/hutch.toml"
            assert volumes[volume]["configMap"]["name"] == config_map["metadata"]["name"]
        for env in container.get("env", []):
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert env["name"] in secret["stringData"] and ref["key"] in secret["stringData"]
    # The mock Service serves every backend URL of the config.
    mock_service = _find(rendered, "Service", "hutch-mock-backend")
    for pool in settings.pools:
        for backend in pool.backends:
            assert backend.url.startswith(
                f"http://{mock_service['metadata']['name']}:"
                f"{mock_service['spec']['ports'][0]['port']}/"), backend.url
    served = _args(rendered, "mock-backend").models.split(",")
    assert {m for pool in settings.pools for m in pool.models} <= set(served)


def test_worker_probes_and_grace_match_the_worker(rendered: list[Resource],
                                                  tmp_path: Path) -> None:
    """The worker serves /metrics, /healthz and /readyz on --metrics-port: its probes use
    them; its termination grace period leaves room above shutdown_grace_s for the
    hand-back."""
    settings = _settings(rendered, tmp_path)
    container = _container(rendered, "worker")
    args = _args(rendered, "worker")
    assert args.func.__module__ == "pipeline.cli.worker"
    assert _ports(container) == {"metrics": args.metrics_port}
    assert _probe_paths(container) == {("metrics", "/healthz"), ("metrics", "/readyz")}
    grace = _deployment(rendered, "worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_grace_s + 10, (grace, settings.shutdown_grace_s)
    annotations = _deployment(rendered, "worker")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    # The probes' paths answer on a real worker metrics server, as the CLI starts it.
    ready = [False]
    server = Metrics(settings=settings).serve(
        0, addr="127.0.0.1", live=LoopHeartbeat().check,
        ready=lambda: (ready[0], "serving" if ready[0] else "connecting to the broker"))
    try:
        base = f"http://127.0.0.1:{server.port}"
        response = httpx.get(f"{base}/metrics", timeout=5)
        healthz = httpx.get(f"{base}/healthz", timeout=5)
        unready = httpx.get(f"{base}/readyz", timeout=5)
        ready[0] = True
        readyz = httpx.get(f"{base}/readyz", timeout=5)
    finally:
        server.close()
    assert response.status_code == 200 and "hutch_backend_lease_held" in response.text
    assert healthz.status_code == 200
    assert unready.status_code == 503 and "connecting" in unready.text
    assert readyz.status_code == 200


def test_gateway_probes_match_the_gateway(rendered: list[Resource]) -> None:
    """/healthz (liveness) and /readyz (readiness) on the HTTP port, metrics on its own."""
    container = _container(rendered, "gateway")
    args = _args(rendered, "gateway")
    assert args.func.__module__ == "pipeline.cli.gateway"
    assert _ports(container) == {"http": args.port, "metrics": args.metrics_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    app = web.Application()
    Gateway(cast(Any, None), cast(Any, None), cast(Any, None), models=[],
            retry_after_s=0).routes(app)
    served = {route.resource.canonical for route in app.router.routes()
              if route.resource is not None and route.method == "GET"}
    assert {"/healthz", "/readyz"} <= served
    service = _find(rendered, "Service", "hutch-gateway")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    mock = _container(rendered, "mock-backend")
    assert _ports(mock) == {"http": _args(rendered, "mock-backend").port}


def test_selectors_match_their_pods(rendered: list[Resource]) -> None:
    """Services, PodDisruptionBudgets and Deployments select their own pods, each."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in of_kind(rendered, "Deployment")}

    def selected(selector: dict[str, str]) -> set[str]:
        return {name for name, labels in pods.items()
                if all(labels.get(k) == v for k, v in selector.items())}

    for deployment in of_kind(rendered, "Deployment"):
        name = deployment["metadata"]["name"]
        assert selected(deployment["spec"]["selector"]["matchLabels"]) == {name}
    for service in of_kind(rendered, "Service"):
        assert selected(service["spec"]["selector"]) == {service["metadata"]["name"]}
    pdbs = {pdb["metadata"]["name"]: selected(pdb["spec"]["selector"]["matchLabels"])
            for pdb in of_kind(rendered, "PodDisruptionBudget")}
    assert pdbs == {"hutch-worker": {"hutch-worker"}, "hutch-gateway": {"hutch-gateway"}}


def _other_queues(names: Names, settings: Settings) -> list[str]:
    """Every queue of Hutch's that is not a pool's work queue or lane."""
    queues = [names.triage_queue, names.parked_queue, names.workers_queue,
              names.retry_queue(1000), names.reply_queue("app"), names.cancel_queue("w1")]
    for pool in settings.pools:
        queues += [names.pool_workers_queue(pool.name), names.pause_state_queue(pool.name),
                   names.pause_queue(pool.name)]
        queues += [names.lease_queue(backend.name) for backend in pool.backends]
    return queues


def test_the_worker_scaler_reads_exactly_the_pools_queues(rendered: list[Resource],
                                                          tmp_path: Path) -> None:
    """KEDA's regex names every pool's work queue and lanes, nothing else; it scales the
    worker Deployment up to one worker per backend lease."""
    settings = _settings(rendered, tmp_path)
    names = Names(settings.prefix)
    scaled = _find(rendered, "ScaledObject", "hutch-worker")
    trigger = scaled["spec"]["triggers"][0]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["protocol"] == "http" and meta["mode"] == "QueueLength"
    assert meta["useRegex"] == "true" and meta["operation"] == "sum"
    regex = re.compile(meta["queueName"])  # RE2 and Python agree on this subset
    assert meta["queueName"].startswith("^") and meta["queueName"].endswith("$")
    pool_queues = [q for pool in settings.pools for q in
                   [names.work_queue(pool.name),
                    *LaneMap(names, pool.name, pool.scheduling).queues()]]
    assert len(pool_queues) > len(settings.pools)  # the lanes are there
    assert [q for q in pool_queues if not regex.search(q)] == []
    assert [q for q in _other_queues(names, settings) if regex.search(q)] == []
    assert _deployment(rendered, "worker")["metadata"]["name"] == \
        scaled["spec"]["scaleTargetRef"]["name"]
    backends = sum(len(pool.backends) for pool in settings.pools)
    assert scaled["spec"]["maxReplicaCount"] == backends
    auth = _find(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    [secret] = of_kind(rendered, "Secret")
    assert ref["parameter"] == "host" and ref["name"] == secret["metadata"]["name"]
    assert secret["stringData"][ref["key"]].startswith("http://")


def test_the_backend_scaler_queries_what_is_exported(rendered: list[Resource],
                                                     tmp_path: Path) -> None:
    """The Prometheus query sums metrics Hutch and RabbitMQ's plugin really export, for a
    configured pool and its backends, and the target is a Deployment of the manifests."""
    settings = _settings(rendered, tmp_path)
    names = Names(settings.prefix)
    scaled = _find(rendered, "ScaledObject", "hutch-mock-backend")
    _deployment(rendered, scaled["spec"]["scaleTargetRef"]["name"].removeprefix("hutch-"))
    meta = scaled["spec"]["triggers"][0]["metadata"]
    query = meta["query"]
    exported = {info.name for info in Metrics().catalog}
    hutch_metrics = set(re.findall(r"\b(hutch_[a-z_]+)\{", query))
    assert hutch_metrics and hutch_metrics <= exported
    assert "rabbitmq_detailed_queue_messages_ready" in query  # deploy/prometheus.yml's job
    [pool_name] = set(re.findall(r'pool="([^"]+)"', query))
    pool = next(p for p in settings.pools if p.name == pool_name)
    [queue_regex] = re.findall(r'queue=~"([^"]+)"', query)
    regex = re.compile(f"^(?:{queue_regex.replace(chr(92) * 2, chr(92))})$")
    assert regex.match(names.work_queue(pool.name))
    assert all(regex.match(q) for q in LaneMap(names, pool.name, pool.scheduling).queues())
    [backend_regex] = re.findall(r'backend=~"([^"]+)"', query)
    assert all(re.fullmatch(backend_regex, b.name) for b in pool.backends)
    assert int(meta["threshold"]) > 0


def test_the_first_apply_step_holds_what_the_topology_job_needs(
        rendered: list[Resource]) -> None:
    """docs/operations/kubernetes.md applies ``component in (config, topology)`` first:
    that selects the Namespace (overlay), the Secret, the ConfigMap and the Job, and
    everything the Job's pod refers to is among them."""
    first = [r for r in rendered if r["metadata"].get("labels", {}).get(
        "app.kubernetes.io/component") in {"config", "topology"}]
    kinds = sorted(r["kind"] for r in first)
    namespace = ["Namespace"] if of_kind(rendered, "Namespace") else []
    assert kinds == sorted(["ConfigMap", "Job", "Secret", *namespace])
    [job] = of_kind(first, "Job")
    pod = job["spec"]["template"]["spec"]
    names = {r["metadata"]["name"] for r in first}
    assert {v["configMap"]["name"] for v in pod["volumes"]} <= names
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"]} <= names
    assert _find(rendered, "Job", "hutch-topology")["spec"]["template"]["spec"][
        "containers"][0]["args"][:2] == ["topology", "apply"]
