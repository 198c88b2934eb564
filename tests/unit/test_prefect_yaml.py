"""prefect.yaml declares the deployments users rely on, pointing at real flows."""

from __future__ import annotations

import importlib

import yaml
from tests.helpers import REPO_ROOT


def _deployments() -> dict[str, dict]:
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in doc["deployments"]}


def _flow_name(entrypoint: str) -> str:
    module, _, attr = entrypoint.partition(":")
    mod = importlib.import_module(module.removesuffix(".py").replace("/", "."))
    return getattr(mod, attr).name


def test_deployments_names_pools_and_schedules():
    deps = _deployments()
    full = {f"{_flow_name(d['entrypoint'])}/{name}": d for name, d in deps.items()}
    assert set(full) == {
        "gender-pipeline/weekly",
        "gender-pipeline/on-demand",
        "train/gpu",
        "watch/every-5-min",
        "monitor/on-arrival",
    }
    weekly, on_demand, gpu = (
        full["gender-pipeline/weekly"],
        full["gender-pipeline/on-demand"],
        full["train/gpu"],
    )
    assert weekly["schedules"][0]["cron"].split() == ["0", "3", "*", "*", "1"]
    assert "schedules" not in on_demand
    assert weekly["work_pool"]["name"] == on_demand["work_pool"]["name"] == "cpu"
    assert gpu["work_pool"]["name"] == "gpu"
    jv = gpu["work_pool"]["job_variables"]
    request = jv["container_create_kwargs"]["device_requests"][0]
    assert request["driver"] == "nvidia" and request["capabilities"] == [["gpu"]]
    assert jv["gpu_limit"] == 1
    # the weekly run trains on the GPU deployment, by its full name
    assert weekly["parameters"]["train_on"] == "train/gpu"


def test_drift_monitoring_is_wired_by_events():
    from flows.monitor import DATA_ARRIVED, DRIFT_DETECTED, monitor, resource_id, watch
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    deps = _deployments()
    trig = {
        name: [DeploymentEventTrigger.model_validate(t) for t in d.get("triggers", [])]
        for name, d in deps.items()
    }
    # new images -> the drift check, with the batch's location from the event
    (arrived,) = trig["on-arrival"]
    assert arrived.expect == {DATA_ARRIVED} and arrived.enabled
    assert arrived.parameters == {"location": "{{ event.payload.location }}"}
    # drift -> the whole pipeline
    (drifted,) = trig["on-demand"]
    assert drifted.expect == {DRIFT_DETECTED} and not drifted.parameters
    pattern = "genderclf.dataset.*"
    for t in (arrived, drifted):
        assert t.match.model_dump()["prefect.resource.id"] == pattern
    assert resource_id("s3://bucket/incoming/b1").startswith(pattern.removesuffix("*"))
    # the watcher is scheduled, on the folder or prefix the user sets at deploy time
    w = deps["every-5-min"]
    assert w["schedules"][0]["interval"] == 300
    assert w["parameters"] == {"location": "{{ $GENDERCLF_WATCH }}"}
    assert {"location"} <= set(
        watch.parameters.properties
    ) and "location" in monitor.parameters.required
    assert trig["weekly"] == trig["gpu"] == trig["every-5-min"] == []
