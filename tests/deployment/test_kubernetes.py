"""deploy/kubernetes/: the KubeRay RayCluster and the Airflow Helm chart values, without a cluster.

What a ``kubectl apply`` or ``helm install`` would refuse, and what would deploy but not work
with this provider: the manifests parse; the RayCluster and the chart values validate against
subsets of KubeRay's CRD schema and the chart's values schema (tests/deployment/schemas/, their
sources named inside); the GPU group scales from zero and asks for GPUs on GPU nodes; the
autoscaler is on; the Ray token comes from a Secret on both sides; the names the values give
(connection variables, ``[batch_inference]`` options, the connection's type and port) are the
ones the provider reads; and no file holds a literal secret.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.version import Version

from airflow_batch_provider.core import api
from airflow_batch_provider.core.ray.connection import RAY_CLIENT_DEFAULT_PORT, RAY_CLIENT_SCHEME
from airflow_batch_provider.get_provider_info import CONFIG_SECTION
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.hooks.storage import DEFAULT_AWS_CONN_ID

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RAYCLUSTER = DEPLOY / "raycluster.yaml"
RAY_SECRET = DEPLOY / "ray-auth-secret.yaml"
AIRFLOW_SECRETS = DEPLOY / "airflow-secrets.yaml"
VALUES = DEPLOY / "airflow-values.yaml"
#: the Secret key KubeRay reads the token from (RAY_AUTH_TOKEN_SECRET_KEY in its operator)
KUBERAY_TOKEN_KEY = "auth_token"
GPU = "nvidia.com/gpu"
PLACEHOLDER = "REPLACE_WITH"


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one YAML document expected, found {len(docs)}"
    return docs[0]


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load(RAYCLUSTER)


@pytest.fixture(scope="module")
def values() -> dict:
    return load(VALUES)


@pytest.fixture(scope="module")
def airflow_secrets() -> dict:
    return load(AIRFLOW_SECRETS)


def groups(cluster: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def all_pod_templates(cluster: dict) -> list[dict]:
    return [cluster["spec"]["headGroupSpec"]["template"], *(g["template"] for g in cluster["spec"]["workerGroupSpecs"])]


# -- the files are what kubectl and helm take --------------------------------------------------

def test_every_file_parses_as_yaml_with_its_kind():
    kinds = {path.name: load(path).get("kind") for path in DEPLOY.glob("*.yaml")}
    assert kinds == {"raycluster.yaml": "RayCluster", "ray-auth-secret.yaml": "Secret",
                     "airflow-secrets.yaml": "Secret", "airflow-values.yaml": None}


def test_raycluster_validates_against_kuberay_crd_subset(cluster):
    jsonschema.validate(cluster, schema("raycluster-v1.subset.json"))


def test_chart_values_validate_against_chart_schema_subset(values):
    jsonschema.validate(values, schema("airflow-chart-values.subset.json"))


def test_schema_subsets_reject_what_they_should(cluster, values):
    """The subsets are not vacuous: a misspelt field and a wrong type fail them."""
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        jsonschema.validate(bad, schema("raycluster-v1.subset.json"))
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["autoscalerOptions"]["version"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema("raycluster-v1.subset.json"))
    bad = json.loads(json.dumps(values))
    bad["triggerer"]["enabled"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema("airflow-chart-values.subset.json"))
    bad = json.loads(json.dumps(values))
    bad["secret"][0]["envname"] = bad["secret"][0].pop("envName")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema("airflow-chart-values.subset.json"))


# -- the RayCluster ----------------------------------------------------------------------------

def test_ray_version_is_the_tested_one_and_kuberay_can_run_it(cluster):
    """KubeRay needs Ray >= 2.52 for token auth and probes the dashboard agent over HTTP from
    2.53; the image's Ray is the one this repository pins (constraints.txt)."""
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert cluster["spec"]["rayVersion"] == pinned
    assert Version(cluster["spec"]["rayVersion"]) >= Version("2.53")


def test_token_auth_from_the_secret(cluster):
    secret = load(RAY_SECRET)
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    assert auth["secretName"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {KUBERAY_TOKEN_KEY}
    # KubeRay sets RAY_AUTH_MODE / RAY_AUTH_TOKEN (a secretKeyRef) itself, and skips a container
    # that names them already: none may, or with a literal it would win over the Secret.
    for template in all_pod_templates(cluster):
        for container in containers(template):
            for env in container.get("env", []):
                assert not env["name"].startswith("RAY_AUTH"), f"{container['name']} sets {env['name']}"


def test_autoscaler_v2_is_on(cluster):
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    # KubeRay refuses a restartPolicy other than Never with the v2 autoscaler
    for template in all_pod_templates(cluster):
        assert template["spec"].get("restartPolicy", "Never") == "Never"


def test_head_runs_no_replica_and_serves_ray_client(cluster):
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["containerPort"]: p["name"] for c in containers(head["template"]) for p in c.get("ports", [])}
    assert ports[RAY_CLIENT_DEFAULT_PORT] == "client"


def test_gpu_group_scales_from_zero_onto_gpu_nodes(cluster):
    gpu = [g for g in cluster["spec"]["workerGroupSpecs"]
           if any(GPU in c.get("resources", {}).get("limits", {}) for c in containers(g["template"]))]
    assert len(gpu) == 1, "one worker group with GPU limits"
    group = gpu[0]
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
    assert group["maxReplicas"] > 0
    ray_container = containers(group["template"])[0]
    limits, requests = ray_container["resources"]["limits"], ray_container["resources"].get("requests", {})
    assert int(limits[GPU]) >= 1
    assert requests.get(GPU, limits[GPU]) == limits[GPU], "extended resources: requests must equal limits"
    pod = group["template"]["spec"]
    assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"], "GPU nodes are selected"
    # num-gpus comes from the container's limit; a rayStartParams one could disagree with it
    assert "num-gpus" not in group["rayStartParams"]


def autoscaler_node_types(cluster: dict) -> dict[str, dict]:
    """The node types KubeRay's autoscaler sidecar makes of the RayCluster: Ray's own translation
    (the code the sidecar runs), with Ray's validation of the autoscaler config it produces."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(json.loads(json.dumps(cluster)))["available_node_types"]


def test_autoscaler_sees_a_gpu_node_type_from_zero(cluster):
    types = autoscaler_node_types(cluster)
    gpu = types["gpu"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 8 and gpu["resources"]["memory"] == 32 << 30
    # the GPU model as a resource of the node type, so that a spec's accelerator_type can be met
    assert gpu["resources"]["accelerator_type:L4"] == 1
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert "GPU" not in types["cpu"]["resources"]


def test_replica_shapes_fit_the_node_types_as_the_provider_counts(cluster):
    """What the provider's feasibility check (``sizing.fits``, node by node) makes of these node
    types: a 1-GPU L4 replica of 24 GiB has a node type that holds it, a 2-GPU one has none."""
    from airflow_batch_provider.core.ray.sizing import fits
    from airflow_batch_provider.core.spec import JobSpec

    def spec(**shape) -> JobSpec:
        return JobSpec(source="s3://b/in/*.jsonl", sink="s3://b/out", predictor="m:C", **shape)

    types = autoscaler_node_types(cluster)
    l4 = spec(num_gpus=1, num_cpus=4, accelerator_type="L4", memory=24 << 30).replica_resources()
    assert fits(types["gpu"]["resources"], l4) == 1
    assert fits(types["cpu"]["resources"], l4) == 0 and fits(types["headgroup"]["resources"], l4) == 0
    two_gpus = spec(num_gpus=2).replica_resources()
    assert not any(fits(t["resources"], two_gpus) for t in types.values())
    half = spec(num_gpus=0.5, num_cpus=1).replica_resources()
    assert fits(types["gpu"]["resources"], half) == 2
    cpu_only = spec(num_cpus=1).replica_resources()
    assert fits(types["cpu"]["resources"], cpu_only) == 4 and fits(types["headgroup"]["resources"], cpu_only) == 0


def test_cpu_group_has_no_gpu_and_every_group_has_sane_bounds(cluster):
    by_name = groups(cluster)
    assert "cpu" in by_name
    assert not any(GPU in c.get("resources", {}).get("limits", {}) for c in containers(by_name["cpu"]["template"]))
    for name, group in by_name.items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name


def test_every_ray_node_has_shared_memory_for_the_object_store(cluster):
    for template in all_pod_templates(cluster):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in containers(template):
            shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", container["name"]


def test_image_has_rays_default_extra():
    """KubeRay probes each node's dashboard agent (Ray >= 2.53), and the head's Ray Client server
    needs grpcio: both come with ray[default], which the provider's own dependency (ray[data])
    does not pull."""
    assert '"ray[default]"' in (ROOT / "docker" / "Dockerfile").read_text()


def test_ray_nodes_and_airflow_run_one_image(cluster, values):
    """Ray Client refuses a client whose Python or Ray version differs from the cluster's."""
    images = {c["image"] for t in all_pod_templates(cluster) for c in containers(t)}
    airflow = values["images"]["airflow"]
    assert images == {f"{airflow['repository']}:{airflow['tag']}"}


# -- the Airflow chart values ------------------------------------------------------------------

def test_executor_and_triggerer_for_deferrable_shards(values):
    assert values["executor"] == "CeleryExecutor"
    assert values["triggerer"]["enabled"] is True and values["triggerer"]["replicas"] >= 1
    assert values["config"]["operators"]["default_deferrable"] == "True"


def test_batch_inference_settings_are_the_providers(values):
    settings = values["config"][CONFIG_SECTION]
    assert set(settings) <= set(api.Tunables.names())
    tunables = api.Tunables.from_values({k: str(v) for k, v in settings.items()})
    # a GPU node from zero takes minutes: the wait must outlast the default, not undercut it
    assert tunables.node_wait_timeout_s >= api.Tunables().node_wait_timeout_s


def test_connections_come_from_secrets_under_the_names_the_provider_reads(values, airflow_secrets):
    if RayHook.conn_type == "ray":
        pytest.skip("the provider still names its connection type 'ray' (ray_default): the values use the "
                    "renamed type 'ray_batch' (ray_batch_default) of the connection rename")
    refs = {s["envName"]: s for s in values["secret"]}
    ray_env = f"AIRFLOW_CONN_{RayHook.default_conn_name.upper()}"
    aws_env = f"AIRFLOW_CONN_{DEFAULT_AWS_CONN_ID.upper()}"
    assert set(refs) == {ray_env, aws_env}
    for ref in refs.values():
        assert ref["secretName"] == airflow_secrets["metadata"]["name"]
        assert ref["secretKey"] in airflow_secrets["stringData"]
    ray_conn = json.loads(airflow_secrets["stringData"][refs[ray_env]["secretKey"]])
    assert ray_conn["conn_type"] == RayHook.conn_type
    aws_conn = json.loads(airflow_secrets["stringData"][refs[aws_env]["secretKey"]])
    assert aws_conn["conn_type"] == "aws"


def test_ray_connection_is_ray_client_to_the_head_service(cluster, airflow_secrets):
    """Airflow's pods are not Ray nodes: a driver given the GCS address looks for a raylet on its
    own host and finds none, so the connection is Ray Client's, to the head's service."""
    conns = [json.loads(v) for v in airflow_secrets["stringData"].values()]
    ray_conn = next(c for c in conns if c["conn_type"] != "aws")
    ray_ns = load(RAY_SECRET)["metadata"]["namespace"]
    assert ray_conn["host"] == (f"{RAY_CLIENT_SCHEME}{cluster['metadata']['name']}-head-svc.{ray_ns}.svc.cluster.local:"
                                f"{RAY_CLIENT_DEFAULT_PORT}")
    assert set(ray_conn) <= {"conn_type", "host", "port", "password", "extra"}


# -- no secret in the repository ---------------------------------------------------------------

def test_no_literal_secret_values(values):
    for path in (RAY_SECRET, AIRFLOW_SECRETS):
        for key, value in load(path)["stringData"].items():
            assert PLACEHOLDER in value, f"{path.name}: {key} holds something other than a placeholder"
            if value.startswith("{"):
                for field in ("password", "login"):
                    assert PLACEHOLDER in json.loads(value).get(field, PLACEHOLDER), f"{path.name}: {key}.{field}"
    # the chart takes secrets inline too (fernetKey, jwtSecret, webserver user's password, ...):
    # none is set; they come from the Secrets named by *SecretName
    inline = {"fernetKey", "jwtSecret", "apiSecretKey", "webserverSecretKey", "sshKey", "password", "pass"}

    def walk(node, where):
        if isinstance(node, dict):
            for key, child in node.items():
                assert key not in inline or child in (None, ""), f"{where}.{key} is set inline"
                walk(child, f"{where}.{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]")

    walk(values, "values")
    for name in ("fernetKeySecretName", "jwtSecretName", "apiSecretKeySecretName"):
        assert values[name]
    assert values["data"]["metadataSecretName"]
    # nothing that looks like a key or token (long runs of hex or base64) in any file
    for path in DEPLOY.glob("*.yaml"):
        found = [run for run in re.findall(r"[A-Za-z0-9+/=]{32,}", path.read_text())
                 if re.search(r"\d", run) and re.search(r"[A-Za-z]", run)]
        assert not found, f"{path.name}: {found}"


def test_deployment_page_names_every_file():
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    for path in DEPLOY.glob("*.yaml"):
        assert f"deploy/kubernetes/{path.name}" in page
