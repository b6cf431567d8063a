"""The deployment manifests against the schemas of what reads them: jobs/kuberay-rayjob.yaml and
jobs/kuberay-rayservice.yaml against KubeRay's CRD schemas (tests/data/kuberay, v1.7.0), with unknown
fields refused as `kubectl apply`'s strict field validation does; jobs/serve_config.yaml and the
RayService's serveConfigV2 against Serve's ServeDeploySchema; and what Serve makes of the config's
deployment options over the application's own (Serve's override_deployment_info)."""

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve._private.application_state import override_deployment_info
from ray.serve._private.build_app import build_app
from ray.serve._private.deployment_info import DeploymentInfo
from ray.serve.schema import ServeDeploySchema

import rayindex
from rayindex.config import AppConfig
from rayindex.infra.resources import GPU_ENV
from rayindex.query.serve import app_builder

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).parent / "data" / "kuberay"
RAY_VERSION = "2.60.0"  # the Ray of cluster.yaml, the images and the manifests (tests/test_images.py)


def strict(schema: dict) -> dict:
    """schema with unknown fields refused wherever it lists an object's fields: what the API server's strict
    field validation (kubectl apply's default) does, where a plain CRD schema would let a misspelt field
    through and the API server would drop it."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_schema(plural: str) -> dict:
    return strict(json.loads(gzip.decompress((SCHEMAS / f"ray.io_{plural}.v1.schema.json.gz").read_bytes())))


def manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "jobs" / name).read_text())


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "serve_config.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    return crd_schema("rayjobs")


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    return crd_schema("rayservices")


def test_the_manifests_pass_kuberays_schemas(rayjob_schema, rayservice_schema):
    job, service = manifest("kuberay-rayjob.yaml"), manifest("kuberay-rayservice.yaml")
    assert (job["apiVersion"], job["kind"], service["kind"]) == ("ray.io/v1", "RayJob", "RayService")
    jsonschema.validate(job, rayjob_schema)
    jsonschema.validate(service, rayservice_schema)


def test_the_schemas_refuse_what_kubernetes_would(rayjob_schema):
    """The check has teeth: a misspelt field, an unknown auth mode and a hand-set token as a number fail."""
    job = manifest("kuberay-rayjob.yaml")
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["rayClusterSpec"]["authOption"] = misspelt["spec"]["rayClusterSpec"].pop("authOptions")
    bad_mode = copy.deepcopy(job)
    bad_mode["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    bad_env = copy.deepcopy(job)
    bad_env["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "RAY_AUTH_TOKEN", "value": 42}
    ]
    for broken in (misspelt, bad_mode, bad_env):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, rayjob_schema)


def cluster_specs() -> list[dict]:
    return [
        manifest("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"],
        manifest("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"],
    ]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_token_authentication_through_auth_options_not_by_hand():
    """KubeRay gives the token to the autoscaler sidecar, the job submitter and its own dashboard client only
    through authOptions; a RAY_AUTH_* variable set by hand would also stop KubeRay from setting its own."""
    for cluster in cluster_specs():
        assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-auth"}
        assert cluster["rayVersion"] == RAY_VERSION  # KubeRay refuses token mode below Ray 2.52.0
        assert cluster["enableInTreeAutoscaling"] is True
        for container in containers(cluster):
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, container["name"]


def test_images_are_the_dockerfiles_and_gpus_are_asked_for_and_tolerated():
    version = rayindex.__version__
    job = manifest("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    head = job["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith(f"/rayindex:{version}")
    (gpu,) = job["workerGroupSpecs"]
    assert gpu["minReplicas"] == gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1  # added for the encoders
    pod = gpu["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["image"].endswith(f"/rayindex-gpu:{version}")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for container in containers(manifest("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"]):
        assert container["image"].endswith(f"/rayindex:{version}")


def test_the_build_job_asks_for_gpus_in_its_runtime_environment():
    """RAYINDEX_GPU in the job's runtime_env reaches the driver wherever KubeRay starts it, and its workers."""
    job = manifest("kuberay-rayjob.yaml")["spec"]
    assert job["entrypoint"].startswith("rayindex build ")
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"] == {"HF_HUB_OFFLINE": "1", GPU_ENV: "1"}


def test_serve_configs_pass_serves_schema_and_carry_the_same_application():
    config = serve_config()
    ServeDeploySchema(**config)
    service_config = yaml.safe_load(manifest("kuberay-rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema(**service_config)
    assert service_config["applications"] == config["applications"]
    for app in config["applications"]:
        AppConfig(**app["args"])  # the args the builder will be given are valid


def deployed_actor_options(config: dict, **args) -> dict:
    """What Serve deploys for config's application: the application built by app_builder from its args (and
    args), then the config's deployment options applied over the code's by Serve's own function."""
    (app,) = ServeDeploySchema(**config).applications
    built = build_app(app_builder(AppConfig(**app.args | args)), name=app.name, make_deployment_handle=lambda *_: None)
    infos = {d.name: DeploymentInfo(d._deployment_config, d._replica_config, 0, "") for d in built.deployments}
    return {name: info.replica_config for name, info in override_deployment_info(infos, app).items()}


def test_replicas_keep_their_cpus_and_s3_endpoint_under_the_shipped_config():
    """No ray_actor_options in the shipped config: the replica CPUs are args.replica_cpus and the S3 endpoint
    reaches the replica (in its config), beside the application's runtime_env."""
    config = serve_config()
    config["applications"][0]["args"]["replica_cpus"] = 3
    (replica,) = deployed_actor_options(config, s3_endpoint="http://minio:9000").values()
    assert replica.ray_actor_options["num_cpus"] == 3
    assert replica.ray_actor_options["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert replica.init_args[0]["s3_endpoint"] == "http://minio:9000"


def test_a_configs_ray_actor_options_would_replace_the_applications():
    """Why the shipped configs set none: Serve takes a deployment's ray_actor_options from the config whole."""
    config = serve_config()
    config["applications"][0]["args"]["replica_cpus"] = 3
    config["applications"][0]["deployments"][0]["ray_actor_options"] = {"num_cpus": 1}
    (replica,) = deployed_actor_options(config).values()
    assert replica.ray_actor_options["num_cpus"] == 1
    for app in [
        *serve_config()["applications"],
        *yaml.safe_load(manifest("kuberay-rayservice.yaml")["spec"]["serveConfigV2"])["applications"],
    ]:
        assert all("ray_actor_options" not in d for d in app["deployments"])
