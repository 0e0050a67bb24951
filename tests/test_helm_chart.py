"""The Helm chart under deploy/helm/raylane, checked with real Helm (Helm's Go library, no cluster).

Each values file under the chart's ``ci/`` folder (and the defaults) is linted strictly and
rendered; built-in kinds are validated against Kubernetes' OpenAPI schemas (kubernetes-validate),
RayCluster / RayJob / RayService against KubeRay's CRD schemas from ``../shared/data/kuberay-crds``.
Like an API server with strict field validation, an unknown field is an error; KubeRay's CEL rules
(``x-kubernetes-validations``) are not evaluated.

The rendered default chart is kept in ``tests/data/helm/default.yaml``; after changing the chart,
regenerate it with ``make helm-golden`` and review the diff.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "raylane"
CRD_DIR = REPO.parent / "shared" / "data" / "kuberay-crds"
GOLDEN = REPO / "tests" / "data" / "helm" / "default.yaml"
RELEASE = "raylane"
NAMESPACE = "raylane"
KUBERNETES_VERSION = "1.31.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# Each case: the values files given to Helm (none: the chart's defaults).
CASES = {
    "default": [],
    "gpu": ["gpu-values.yaml"],
    "serving-only": ["serving-only-values.yaml"],
    "external-redis": ["external-redis-values.yaml"],
}
BASE_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap"}
REDIS_KINDS = {"Secret", "Service", "StatefulSet"}
EXPECTED_KINDS = {
    "default": BASE_KINDS | REDIS_KINDS | {"RayCluster", "RayJob"},
    "gpu": BASE_KINDS | REDIS_KINDS | {"RayCluster", "RayJob"},
    "serving-only": BASE_KINDS | REDIS_KINDS | {"RayService"},
    "external-redis": BASE_KINDS | {"RayJob", "RayService"},
}


def case_values(case: str) -> dict[str, Any]:
    """The values of ``case``: its values files merged in order, as ``helm -f`` does."""
    values: dict[str, Any] = {}
    for name in CASES[case]:
        values = _deep_merge(values, yaml.safe_load((CHART / "ci" / name).read_text()))
    return values


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as ``helm template`` renders it for an install."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def rendered(case: str) -> tuple[list[dict[str, Any]], str]:
    """The objects ``case`` renders and its NOTES.txt."""
    manifests = render(case_values(case))
    notes = manifests.pop(f"{CHART.name}/templates/NOTES.txt")
    objects = [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def objects_of(case: str, kind: str) -> list[dict[str, Any]]:
    return [obj for obj in rendered(case)[0] if obj["kind"] == kind]


def one(case: str, kind: str, suffix: str = "") -> dict[str, Any]:
    """The one object of ``kind`` (whose name ends with ``suffix``) that ``case`` renders."""
    (obj,) = [obj for obj in objects_of(case, kind) if obj["metadata"]["name"].endswith(suffix)]
    return obj


def cluster_specs(case: str) -> list[dict[str, Any]]:
    """Every Ray cluster spec ``case`` renders: a RayCluster's, a RayJob's own, a RayService's."""
    specs = [obj["spec"] for obj in objects_of(case, "RayCluster")]
    specs += [
        obj["spec"]["rayClusterSpec"] for obj in objects_of(case, "RayJob") if "rayClusterSpec" in obj["spec"]
    ]
    specs += [obj["spec"]["rayClusterConfig"] for obj in objects_of(case, "RayService")]
    return specs


def pod_specs(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def serve_config(case: str) -> dict[str, Any]:
    return yaml.safe_load(one(case, "RayService")["spec"]["serveConfigV2"])


# ---------------------------------------------------------------- lint, render, schemas


@pytest.mark.parametrize("case", CASES)
def test_lint_strict_passes(case):
    report = helm.lint(CHART, case_values(case), strict=True, namespace=NAMESPACE)
    assert report["messages"] == [], report
    assert report["errors"] == []


@pytest.mark.parametrize("case", CASES)
def test_renders_the_kinds_its_values_turn_on(case):
    assert {obj["kind"] for obj in rendered(case)[0]} == EXPECTED_KINDS[case]


@pytest.mark.parametrize("case", CASES)
def test_builtin_kinds_match_kubernetes_schemas(case):
    builtin = [obj for obj in rendered(case)[0] if not obj["apiVersion"].startswith("ray.io/")]
    assert builtin
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(
                f"{obj['kind']} {obj['metadata']['name']}: {err.message} at {list(err.absolute_path)}"
            )


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator of ``kind`` from KubeRay's CRD (served version v1), strict about unknown fields."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (they are shared reference data, not in the repo)")
    with open(CRD_DIR / CRD_FILES[kind]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _strict(schema: Any) -> Any:
    """Forbid fields a structural schema does not declare, as strict field validation does."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@pytest.mark.parametrize("case", CASES)
def test_ray_kinds_match_kuberay_crds(case):
    ray_objects = [obj for obj in rendered(case)[0] if obj["apiVersion"].startswith("ray.io/")]
    assert ray_objects
    for obj in ray_objects:
        assert obj["apiVersion"] == "ray.io/v1"
        errors = [
            f"{'/'.join(map(str, err.absolute_path))}: {err.message}"
            for err in crd_validator(obj["kind"]).iter_errors(obj)
        ]
        assert errors == [], f"{obj['kind']} {obj['metadata']['name']}"


# ---------------------------------------------------------------- what the objects say


def test_gpu_workers_request_gpus_on_the_selected_nodes():
    values = case_values("gpu")["gpuWorkers"]
    (gpu_group,) = [
        g for g in one("gpu", "RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"
    ]
    pod = gpu_group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == values["gpusPerPod"]
    assert resources["limits"]["nvidia.com/gpu"] == values["gpusPerPod"]
    assert resources["requests"]["memory"] == "64Gi"
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert (gpu_group["replicas"], gpu_group["maxReplicas"]) == (2, 4)
    assert gpu_group["rayStartParams"] == {"num-cpus": "16"}
    (shared,) = [v for v in pod["volumes"] if v["name"] == "shared"]
    assert (
        shared["persistentVolumeClaim"]["claimName"] == case_values("gpu")["sharedStorage"]["existingClaim"]
    )
    groups = [g["groupName"] for g in one("default", "RayCluster")["spec"]["workerGroupSpecs"]]
    assert groups == ["cpu"]


@pytest.mark.parametrize("case", CASES)
def test_every_ray_pod_has_a_memory_backed_dev_shm(case):
    """Ray's object store and lazy checkpoints' memory tier need more than a container's 64 MiB."""
    for spec in cluster_specs(case):
        for pod in pod_specs(spec):
            (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert dshm["emptyDir"] == {"medium": "Memory"}
            mounts = pod["containers"][0]["volumeMounts"]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts


def test_dev_shm_size_limit_and_switch():
    def dshm_volumes(values):
        manifests = {path: text for path, text in render(values).items() if not path.endswith("NOTES.txt")}
        objects = [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]
        cluster = next(obj for obj in objects if obj["kind"] == "RayCluster")
        return [v for pod in pod_specs(cluster["spec"]) for v in pod["volumes"] if v["name"] == "dshm"]

    limited = dshm_volumes({"sharedMemory": {"sizeLimit": "8Gi"}})
    assert limited and all(v["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"} for v in limited)
    assert dshm_volumes({"sharedMemory": {"enabled": False}}) == []


@pytest.mark.parametrize("case", ["default", "external-redis"])
def test_the_job_trains_on_the_config_in_its_configmap(case, tmp_path):
    from raylane.config import load_config
    from raylane.controllers.config import JobConfig

    job = one(case, "RayJob")["spec"]
    assert job["entrypoint"] == "raylane train /config/job.yaml"
    configmap = one(case, "ConfigMap", "-job")
    head = (job["rayClusterSpec"] if "rayClusterSpec" in job else one(case, "RayCluster")["spec"])[
        "headGroupSpec"
    ]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/config"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    if "clusterSelector" in job:
        assert job["clusterSelector"] == {"ray.io/cluster": one(case, "RayCluster")["metadata"]["name"]}
    path = tmp_path / "job.yaml"
    path.write_text(configmap["data"]["job.yaml"])
    config = load_config(JobConfig, str(path))
    assert config.output_dir.startswith(case_values(case).get("sharedStorage", {}).get("mountPath", "/data"))


@pytest.mark.parametrize("case", ["serving-only", "external-redis"])
def test_serve_config_builds_raylanes_application(case, monkeypatch):
    """Serve's own schema accepts serveConfigV2, and its import path builds the app from its args
    in the environment of the pods (their Secret-backed variables set to stand-in values)."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from raylane.serving.builder import IMPORT_PATH

    head = one(case, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    for var in head["containers"][0].get("env", []):
        monkeypatch.setenv(var["name"], var.get("value", "from-a-secret"))
    config = ServeDeploySchema.model_validate(serve_config(case))
    (app,) = config.applications
    assert app.import_path == IMPORT_PATH
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    models = {m["name"] for m in case_values(case).get("rayService", {}).get("models", [{"name": "policy"}])}
    # One model: the ingress runs in the model's own deployment; several: one deployment routes to theirs.
    ingress = set() if len(models) == 1 else {"OpenAIIngress"}
    assert {d.name for d in _deployments(built)} == {*ingress, *(f"LLMServer-{m}" for m in models)}


def _deployments(app: Any) -> list[Any]:
    from ray.serve._private.build_app import build_app

    return [d for d in build_app(app, name="raylane").deployments]


def test_serving_app_requires_the_key_the_pods_get(monkeypatch):
    """The app serveConfigV2 builds holds the digest of $RAYLANE_API_KEY, the variable the chart fills."""
    from raylane.serving.auth import key_digest
    from raylane.serving.builder import build_app_from_args

    monkeypatch.setenv("RAYLANE_API_KEY", "key-from-the-secret")
    app = build_app_from_args(serve_config("serving-only")["applications"][0]["args"])
    assert key_digest("key-from-the-secret") in app._bound_deployment.init_args


def test_serving_app_refuses_grpc_when_the_key_is_missing(monkeypatch):
    """Should the Secret be empty in a pod, the app is not built with gRPC open to every interface."""
    from raylane.serving.builder import build_app_from_args

    monkeypatch.delenv("RAYLANE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="gRPC would listen on every interface"):
        build_app_from_args(serve_config("serving-only")["applications"][0]["args"])


def test_serving_limits_and_scaling_come_from_values():
    values = case_values("serving-only")["rayService"]
    (model,) = serve_config("serving-only")["applications"][0]["args"]["models"]
    assert model["engine"]["model"] == values["models"][0]["path"]
    assert model["autoscaling"] == values["autoscaling"]
    assert "num_replicas" not in model
    assert model["limits"] == values["limits"]["request"]
    assert serve_config("serving-only")["applications"][0]["args"]["max_request_bytes"] == 1048576
    assert (model["max_ongoing_requests"], model["max_queued_requests"], model["max_waiting_seqs"]) == (
        128,
        256,
        256,
    )


def test_schema_knows_every_request_limit():
    """The chart's per-request limits are exactly the fields of raylane's RequestLimits."""
    from raylane.serving.config import RequestLimits

    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
    limits = schema["properties"]["rayService"]["properties"]["limits"]["properties"]["request"]
    assert set(limits["properties"]) == set(RequestLimits.model_fields)


def test_api_key_reaches_every_serving_pod_from_its_secret():
    secret = case_values("serving-only")["rayService"]["apiKey"]["existingSecret"]
    for pod in pod_specs(one("serving-only", "RayService")["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAYLANE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "api-key"}


def test_grpc_is_not_exposed_without_an_api_key():
    serving = case_values("serving-only")
    assert serve_config("serving-only")["grpc_options"]["port"] == 9000
    grpc_service = one("serving-only", "Service", "-grpc")["spec"]
    assert [(p["port"], p["targetPort"]) for p in grpc_service["ports"]] == [(9000, 9000)]
    selector = grpc_service["selector"]
    assert selector.pop("ray.io/serve") == "true"  # the label KubeRay puts on pods with a healthy proxy
    serving_pods = one("serving-only", "RayService")["spec"]["rayClusterConfig"]
    for group in [serving_pods["headGroupSpec"], *serving_pods["workerGroupSpecs"]]:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()

    config = serve_config("external-redis")  # serving with the default values: no key, no gRPC
    assert "grpc_options" not in config
    assert config["applications"][0]["args"]["grpc_port"] is None
    spec = one("external-redis", "RayService")["spec"]
    assert not [
        svc for svc in objects_of("external-redis", "Service") if svc["metadata"]["name"].endswith("-grpc")
    ]
    for pod in pod_specs(spec["rayClusterConfig"]):
        assert "grpc" not in {p["name"] for p in pod["containers"][0].get("ports", [])}

    without_key = _deep_merge(serving, {"rayService": {"apiKey": {"existingSecret": ""}}})
    with pytest.raises(helm.HelmRenderError, match=r"rayService\.apiKey\.existingSecret"):
        render(without_key)
    trusted = _deep_merge(without_key, {"rayService": {"grpc": {"withoutApiKey": True}}})
    assert "grpc_options" in yaml.safe_load(
        yaml.safe_load(render(trusted)[f"{CHART.name}/templates/rayservice.yaml"])["spec"]["serveConfigV2"]
    )


def test_gcs_fault_tolerance_uses_the_charts_redis_and_its_secret():
    ft = one("serving-only", "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    service = one("serving-only", "Service", "-redis")
    assert ft["redisAddress"] == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:6379"
    redis = one("serving-only", "StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == env["REDIS_PASSWORD"]
    assert env["REDIS_PASSWORD"]["name"] == one("serving-only", "Secret")["metadata"]["name"]
    assert container["args"][:2] == ["--appendonly", "yes"]
    assert "$(REDIS_PASSWORD)" in container["args"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert claim["metadata"]["name"] == "data"


def test_external_redis_replaces_the_charts_own():
    external = case_values("external-redis")["redis"]["external"]
    ft = one("external-redis", "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == external["address"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {
        "name": external["existingSecret"],
        "key": external["passwordKey"],
    }


@pytest.mark.parametrize("case", CASES)
def test_rbac_allows_reading_and_patching_nodes_and_reading_the_releases_pods_only(case):
    (cluster_role,) = objects_of(case, "ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    (role,) = objects_of(case, "Role")
    assert role["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    account = one(case, "ServiceAccount")["metadata"]["name"]
    for kind, granted in (("ClusterRoleBinding", cluster_role), ("RoleBinding", role)):
        binding = one(case, kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": granted["kind"],
            "name": granted["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    for spec in cluster_specs(case):
        assert {pod["serviceAccountName"] for pod in pod_specs(spec)} == {account}


def test_rbac_off_renders_no_account_and_no_grant():
    manifests = render({"rbac": {"create": False}})
    manifests.pop(f"{CHART.name}/templates/NOTES.txt")
    kinds = {doc["kind"] for text in manifests.values() for doc in yaml.safe_load_all(text) if doc}
    assert not kinds & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


@pytest.mark.parametrize("case", CASES)
def test_notes_say_how_to_reach_what_is_installed(case):
    notes = rendered(case)[1]
    kinds = {obj["kind"] for obj in rendered(case)[0]}
    assert ("port-forward svc/raylane-head-svc 8265:8265" in notes) == ("RayCluster" in kinds)
    assert ("logs -f job/raylane-train" in notes) == ("RayJob" in kinds)
    assert ("/v1/models" in notes) == ("RayService" in kinds)


def test_image_recipe_matches_the_chart():
    """The Dockerfile installs the Ray the chart announces to KubeRay, and the extras it names exist."""
    import tomllib

    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    build_args = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", dockerfile))
    with helm.Chart.load(CHART) as chart:
        metadata, values = chart.metadata, chart.values
    assert build_args["RAY_VERSION"] == values["rayVersion"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert metadata["appVersion"] == project["version"]
    assert values["image"]["tag"] == f"{project['version']}-{build_args['VARIANT']}"
    (extras,) = re.findall(r'pip install "?\.\[([\w,]+)\]', dockerfile)
    assert set(extras.split(",")) <= set(project["optional-dependencies"])


def test_dashboard_panels_plot_metrics_raylane_registers():
    """Every metric a panel queries is one raylane registers (Ray exports it as ray_<name>, a counter
    as ray_<name>_total, a histogram as ray_<name>_bucket/_sum/_count), and every registered metric
    has a panel."""
    from tests.test_metric_names import registered_metric_names

    dashboard = json.loads(one("default", "ConfigMap", "-grafana-dashboard")["data"]["raylane.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "raylane.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {
        name
        for expr in exprs
        for name in re.findall(r"\bray_(raylane_\w+?)(?:_total|_bucket|_sum|_count)?\b", expr)
    }
    assert all(re.search(r"\bray_raylane_\w+", expr) for expr in exprs), exprs
    assert queried == set(registered_metric_names())
    (job_variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert set(re.findall(r"\bray_(raylane_\w+)", job_variable["query"]["query"])) <= queried


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gpuWorkers": {"gpusPerPod": 0}}, r"/gpuWorkers/gpusPerPod': minimum: got 0, want 1"),
        ({"cpuWorker": {"enabled": True}}, r"additional properties 'cpuWorker' not allowed"),
        ({"image": {"pullPolicy": "Sometimes"}}, r"/image/pullPolicy': value must be one of"),
        ({"rayVersion": 2.6}, r"/rayVersion'"),
        ({"head": {"resources": {"requests": {"cpu": "two"}}}}, r"/head/resources/requests/cpu'"),
        (
            {"rayService": {"models": [{"name": "policy", "path": "models/policy"}]}},
            r"/rayService/models/0/path'",
        ),
        ({"redis": {"external": {"address": "redis://r:6379"}}}, r"/redis/external/address'"),
        ({"sharedMemory": {"sizeLimit": "lots"}}, r"/sharedMemory/sizeLimit'"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)
    report = helm.lint(CHART, values, strict=True)
    assert any(re.search(message, error) for error in report["errors"]), report


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rayService": {"enabled": True}, "redis": {"enabled": False}}, r"gcsFaultTolerance needs a Redis"),
        (
            {"redis": {"enabled": False, "external": {"address": "r:6379"}}},
            r"name the Secret holding its password in redis\.external\.existingSecret",
        ),
    ],
)
def test_values_that_do_not_fit_together_fail_the_render(values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


# ---------------------------------------------------------------- golden file


def golden_text() -> str:
    """The default chart as ``helm template`` prints it; the random Redis password is masked."""
    manifests = render({})
    parts = [
        f"---\n# Source: {path}\n{text.strip()}\n"
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt") and text.strip()
    ]
    return re.sub(r"(?m)^(  password: )\S+$", r"\1MASKED-RANDOM-AT-INSTALL", "".join(parts))


def test_golden_default_render_is_current():
    assert GOLDEN.exists(), "no golden file: run `make helm-golden`"
    assert golden_text() == GOLDEN.read_text(), (
        "the default chart renders differently from tests/data/helm/default.yaml: "
        "run `make helm-golden` and review the diff"
    )


if __name__ == "__main__":  # `make helm-golden`
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(golden_text())
    print(f"wrote {GOLDEN.relative_to(REPO)}", file=sys.stderr)
