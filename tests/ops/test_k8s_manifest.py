"""The Kubernetes indexed Job of distributed training (deploy/kubernetes/train-job.yaml):
its structure, checked against what `genderclf.model.distributed` reads. Not run on a
cluster (none here)."""

from __future__ import annotations

import yaml
from tests.helpers import REPO_ROOT

from genderclf.model import distributed as D

MANIFEST = REPO_ROOT / "deploy" / "kubernetes" / "train-job.yaml"


def _docs() -> dict[str, dict]:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    return {d["kind"]: d for d in docs}


def test_the_indexed_job_starts_one_process_per_pod_and_names_the_coordinator():
    docs = _docs()
    job, service = docs["Job"], docs["Service"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"  # JOB_COMPLETION_INDEX = the process id
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    n = int(env[D.ENV_PROCESSES])
    assert spec["completions"] == spec["parallelism"] == n >= 2  # all processes at once
    assert spec["backoffLimit"] == 0  # a lone process cannot go on: the Job fails
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert D.ENV_PROCESS_ID not in env  # each pod's id comes from its index

    # Pod 0 is reachable at <job>-0.<service>, the address every process joins.
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    host, port = env[D.ENV_ADDRESSES].split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    assert env[D.ENV_BIND] == f"$(POD_IP):{port}"  # defined before it: Kubernetes expands it
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index(D.ENV_BIND)

    # The stage's own command on the JAX backend; the manifest agrees with from_env.
    assert container["command"] == ["genderclf", "train"]
    assert env["KERAS_BACKEND"] == "jax"
    pod_env = {k: v for k, v in env.items() if v is not None}
    for index in range(n):
        cluster = D.from_env({**pod_env, D.ENV_K8S_INDEX: str(index)})
        assert (cluster.processes, cluster.process_id) == (n, index)
        assert cluster.is_chief == (index == 0)

    # The workspace and the backups on one shared volume: outputs and resumes survive pods.
    (mount,) = container["volumeMounts"]
    assert env[D.ENV_BACKUPS].startswith(mount["mountPath"] + "/")
    assert container["workingDir"].startswith(mount["mountPath"] + "/")
    (volume,) = spec["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"] and "persistentVolumeClaim" in volume
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
