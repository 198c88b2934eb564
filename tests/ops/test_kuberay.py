"""deploy/kuberay/raycluster.yaml: the Ray cluster genderclf runs on in Kubernetes.

No Kubernetes here: the manifest is checked for what genderclf needs of it (the Ray version
of uv.lock, token authentication, CPU workers and GPU workers for predict, the images built
with the `cluster` extra, no secret in it, a private head Service), and each pod template
is validated against Kubernetes' own schema (the `kubernetes-validate` package, offline).
KubeRay's CRD schema itself is not available offline; its fields are checked by name.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from tests.helpers import REPO_ROOT

MANIFEST = REPO_ROOT / "deploy" / "kuberay" / "raycluster.yaml"
SECRET_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL)", re.I)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(docs) == 1
    return docs[0]


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]


def _locked(package: str) -> str:
    lock = (REPO_ROOT / "uv.lock").read_text()
    found = re.search(rf'\[\[package\]\]\nname = "{package}"\nversion = "([^"]+)"', lock)
    assert found, f"{package} not in uv.lock"
    return found.group(1)


def test_it_is_a_raycluster_of_the_locked_ray_version(cluster):
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["rayVersion"] == _locked("ray")


def test_token_authentication_and_a_private_head(cluster):
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # work goes to workers


def test_cpu_workers_and_gpu_workers_for_predict(cluster):
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    assert gpu["image"] == "genderclf:cluster-gpu"


def test_every_node_runs_genderclfs_image_as_a_user(cluster):
    for group in _groups(cluster):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert not pod.get("hostNetwork")
        for c in pod["containers"]:
            assert c["image"].startswith("genderclf:cluster")
        # KubeRay passes rayStartParams to `ray start` as strings.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_no_secret_in_the_manifest(cluster):
    for group in _groups(cluster):
        for c in group["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                assert not (SECRET_NAMES.search(e["name"]) and "value" in e), e
            for ref in c.get("envFrom", []):
                assert set(ref) == {"secretRef"} and ref["secretRef"].get("optional") is True


def test_the_images_are_built_with_the_cluster_extra():
    text = MANIFEST.read_text()
    assert '--build-arg UV_EXTRAS="--extra server --extra cluster"' in text
    assert "--extra gpu --extra cluster" in text
    extras = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^cluster = \["ray\[default\]==', extras, re.M)


def test_pod_templates_pass_kubernetes_schema(cluster):
    import kubernetes_validate

    for group in _groups(cluster):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "genderclf"},
            "template": group["template"],
        }
        kubernetes_validate.validate(pod_template, "1.33", strict=True)


def test_the_manifest_is_documented():
    doc = (REPO_ROOT / "docs" / "scaling-out.md").read_text()
    assert "deploy/kuberay/raycluster.yaml" in doc
