"""The cluster definitions in cluster/: the AWS launcher config validates against Ray's own
schema (offline), and the KubeRay RayCluster has the shape the KubeRay operator needs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"

GPU_INSTANCES = {"g5.xlarge": "A10G", "g6.xlarge": "L4", "p4d.24xlarge": "A100",
                 "g5.2xlarge": "A10G", "g6e.xlarge": "L40S", "p5.48xlarge": "H100"}
"""EC2 GPU instance types and their GPU."""

NODE_CAPACITY = {"g5.xlarge": (4, 16), "g6.xlarge": (4, 16)}
"""(vCPUs, GiB) of the Kubernetes nodes the KubeRay worker groups select. A pod must request
less than that: the kubelet and system daemons reserve part of every node."""

IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d+)(?P<variant>-\w+)?$")
"""Published Ray images. `rayproject/ray-ml` is no longer published for recent Ray releases
(ray-project/ray#46378): such a tag cannot be pulled."""


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


@pytest.fixture(scope="module")
def kuberay():
    return yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())


def _validate(config):
    validate_config(prepare_config(copy.deepcopy(config)))


# ----------------------------------------------------------------------------------- AWS
def test_aws_config_validates_against_ray_schema(aws):
    _validate(aws)
    prepared = prepare_config(copy.deepcopy(aws))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_head_is_cpu_and_gpu_groups_scale_from_zero(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["node_config"]["InstanceType"] not in GPU_INSTANCES
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = {name: t for name, t in types.items()
                  if t["node_config"]["InstanceType"] in GPU_INSTANCES}
    assert len(gpu_groups) >= 2
    instance_types = [t["node_config"]["InstanceType"] for t in gpu_groups.values()]
    assert len(set(instance_types)) == len(instance_types)
    assert len({GPU_INSTANCES[i] for i in instance_types}) >= 2  # distinct GPU types to profile
    for name, group in gpu_groups.items():
        assert group["min_workers"] == 0, name
        assert group["max_workers"] >= 1, name
        assert group["max_workers"] <= aws["max_workers"], name


def test_aws_custom_cpu_type_uses_the_profilers_label(aws):
    from nas_prune.profile import CUSTOM_PREFIX, discover_hardware

    labels = {key for t in aws["available_node_types"].values()
              for key in t.get("resources", {}) if key.startswith(CUSTOM_PREFIX)}
    for label in labels:
        assert label[len(CUSTOM_PREFIX):] in discover_hardware({label: 1})


def test_aws_image_matches_installed_ray(aws):
    match = IMAGE.match(aws["docker"]["image"])
    assert match, aws["docker"]["image"]
    assert match["version"] == ray.__version__
    assert match["variant"] == "-gpu"
    pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", " ".join(aws["setup_commands"]))
    assert pins == [ray.__version__]


def test_aws_start_commands_expose_the_job_api(aws):
    head = " ".join(aws["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert any("$RAY_HEAD_IP" in c for c in aws["worker_start_ray_commands"])


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c.pop("head_node_type"), "head_node_type"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu_a10g"].update(min_workers="zero"), "zero"),
        (lambda c: c["available_node_types"]["gpu_l4"].pop("node_config"), "node_config"),
        (lambda c: c["provider"].pop("type"), "type"),
    ],
)
def test_aws_config_mutations_fail_validation(aws, mutate, error):
    broken = copy.deepcopy(aws)
    mutate(broken)
    with pytest.raises(Exception, match=error):  # jsonschema ValidationError, ValueError, ...
        _validate(broken)


# ----------------------------------------------------------------------------------- KubeRay
def _containers(template):
    return template["spec"]["containers"]


def test_kuberay_manifest_shape(kuberay):
    assert kuberay["apiVersion"] == "ray.io/v1"
    assert kuberay["kind"] == "RayCluster"
    assert kuberay["metadata"]["name"]
    spec = kuberay["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    (container,) = _containers(head["template"])
    assert container["image"] and container["name"]
    assert 8265 in [p["containerPort"] for p in container["ports"]]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_kuberay_gpu_worker_groups(kuberay):
    groups = kuberay["spec"]["workerGroupSpecs"]
    assert len(groups) >= 2
    names = [g["groupName"] for g in groups]
    assert all(names) and len(set(names)) == len(names)
    selected = []
    for group in groups:
        assert group["minReplicas"] == 0
        assert group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        template = group["template"]
        (container,) = _containers(template)
        assert container["image"] and container["name"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        selected.append(template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"])
    assert len(set(selected)) == len(selected)  # one group per GPU type
    assert len({GPU_INSTANCES[s] for s in selected}) >= 2


def _quantity_gib(value: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value) / 2**30


def _quantity_cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_kuberay_worker_pods_fit_their_nodes(kuberay):
    for group in kuberay["spec"]["workerGroupSpecs"]:
        template = group["template"]
        instance = template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        cpus, gib = NODE_CAPACITY[instance]
        for container in _containers(template):
            requests = container["resources"]["requests"]
            assert _quantity_cpu(str(requests["cpu"])) < cpus, (group["groupName"], requests)
            assert _quantity_gib(str(requests["memory"])) < gib, (group["groupName"], requests)


def test_kuberay_images_match_installed_ray(kuberay):
    spec = kuberay["spec"]
    assert spec["rayVersion"] == ray.__version__
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        for container in _containers(template):
            match = IMAGE.match(container["image"])
            assert match, container["image"]
            assert match["version"] == ray.__version__


def test_kuberay_pods_install_nas_prune_dependencies_before_ray_starts(kuberay):
    """The plain Ray image lacks torch, transformers and DeepSpeed: each pod installs them,
    then runs the ray start command KubeRay generated (so a node joins only when ready)."""
    spec = kuberay["spec"]
    assert kuberay["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        for container in _containers(template):
            script = " ".join(container["args"])
            assert container["command"][0] in ("/bin/bash", "bash")
            for package in ("torch==2.13.0", "transformers", "deepspeed",
                            f"ray[tune,train,default]=={ray.__version__}"):
                assert package in script, (container["name"], package)
            assert script.index("pip install") < script.index("$KUBERAY_GEN_RAY_START_CMD")
