"""Distributed training's pure parts: the process's place from the environment, the shard
plan (each process its own shards, the same steps everywhere), the checks that name the
key to change, and the settings' batch split."""

from __future__ import annotations

import pytest

from genderclf.config import SettingsError
from genderclf.contracts import PreparedData, SplitShards
from genderclf.model import distributed as D


def _meta(records: int, shard_size: int) -> PreparedData:
    shards = -(-records // shard_size)
    names = [f"train-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    return PreparedData(
        image_size=32,
        resize="center_crop",
        encoding="jpeg",
        jpeg_quality=95,
        seed=0,
        augment={"shard_size": shard_size},
        splits={"train": SplitShards(records, records, 0, 0, names)},
    )


def test_the_place_comes_from_keras_variables_or_the_job_index():
    assert D.from_env({}) is None  # not started by a launcher
    env = {D.ENV_PROCESSES: "4", D.ENV_ADDRESSES: "host-0:7777", D.ENV_PROCESS_ID: "2"}
    assert D.from_env(env) == D.Cluster(4, 2, "host-0:7777")
    k8s = {D.ENV_PROCESSES: "2", D.ENV_ADDRESSES: "a:1,b:2", D.ENV_K8S_INDEX: "0"}
    cluster = D.from_env(k8s)
    assert cluster == D.Cluster(2, 0, "a:1") and cluster.is_chief and cluster.distributed
    for bad in ({**env, D.ENV_PROCESS_ID: "4"}, {**env, D.ENV_ADDRESSES: ""}):
        with pytest.raises(D.DistributedError, match="0 <= KERAS_DISTRIBUTION_PROCESS_ID"):
            D.from_env(bad)
    with pytest.raises(D.DistributedError, match="integer"):
        D.from_env({D.ENV_PROCESSES: "two", D.ENV_ADDRESSES: "a:1", D.ENV_PROCESS_ID: "0"})


def test_each_process_reads_its_own_shards_for_the_same_number_of_steps():
    meta = _meta(records=360, shard_size=64)  # shards of 64, 64, 64, 64, 64, 40
    plans = [D.shard_plan(meta, "train", D.Cluster(2, r, "x:1"), 16) for r in range(2)]
    names = meta.split("train").shards
    assert plans[0].shards == names[0::2] and plans[1].shards == names[1::2]
    assert (plans[0].records, plans[1].records) == (192, 168)
    assert {p.batch for p in plans} == {8}  # the global batch of 16 over 2 processes
    assert {p.steps for p in plans} == {168 // 8}  # the smaller share sets the steps
    assert {p.records_per_epoch for p in plans} == {168}  # 24 records of process 0 dropped
    one = D.shard_plan(meta, "train", D.Cluster(), 16)
    assert (one.shards, one.steps) == (names, 360 // 16)


def test_too_few_shards_or_records_name_what_to_change():
    with pytest.raises(D.DistributedError, match=r"1 train shard\(s\) for train\.processes=2"):
        D.shard_plan(_meta(100, 2000), "train", D.Cluster(2, 0, "x:1"), 16)
    with pytest.raises(D.DistributedError, match="cannot fill one batch"):
        D.shard_plan(_meta(10, 4), "train", D.Cluster(2, 0, "x:1"), 16)


def test_more_than_one_process_needs_the_jax_backend_and_the_launched_count(make_settings):
    two = make_settings({"train.processes": 2, "train.batch_size": 16}).train
    D.check(two, None, "jax")
    with pytest.raises(D.DistributedError, match="KERAS_BACKEND=tensorflow"):
        D.check(two, None, "tensorflow")
    with pytest.raises(D.DistributedError, match=r"train\.processes=2 .* one of 3"):
        D.check(two, D.Cluster(3, 0, "x:1"), "jax")
    D.check(make_settings().train, None, "tensorflow")  # one process: any backend


def test_the_global_batch_must_split_over_the_processes(make_settings):
    with pytest.raises(SettingsError, match=r"train\.batch_size=10 does not split over 4"):
        make_settings({"train.processes": 4, "train.batch_size": 10})
    with pytest.raises(SettingsError, match=r"train\.processes"):
        make_settings({"train.processes": 0})


def test_the_backup_root_can_be_a_share(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.delenv(D.ENV_BACKUPS, raising=False)
    assert D.backup_root(Path(".cache/train")) == Path(".cache/train")
    monkeypatch.setenv(D.ENV_BACKUPS, str(tmp_path))
    assert D.backup_root(Path(".cache/train")) == tmp_path
