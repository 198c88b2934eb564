"""The hand-off files (`genderclf.contracts`): written once, read back equal, and a file of
an older genderclf refused in one line that names the file and the stage to re-run."""

from __future__ import annotations

import json

import pytest

from genderclf.contracts import (
    Calibration,
    ContractError,
    Evaluation,
    ModelInput,
    PreparedData,
    PreparedDataError,
    SplitShards,
    TrainedModel,
)


def _prepared() -> PreparedData:
    split = SplitShards(images=3, records=6, copies=1, male=1, shards=["train-00000-of-00001"])
    return PreparedData(32, "center_crop", "jpeg", 95, 7, {"copies": 1}, {"train": split})


def _evaluation() -> Evaluation:
    return Evaluation(
        accuracy=0.9,
        precision=0.8,
        recall=0.85,
        f1=0.82,
        roc_auc=None,
        average_precision=None,
        ece=0.04,
        n=20,
        confusion_matrix=[[9, 1], [1, 9]],
        threshold_rule="calibrated",
        threshold_calibrated=0.5,
        threshold_raw=0.394,
        calibration=Calibration("platt", 1.2, -0.3, 0.09),
        val_accuracy_at_threshold=0.88,
        accuracy_ci=[0.7, 0.98],
        f1_ci=None,
        roc_auc_ci=None,
        slices={"by_attribute": {}, "min_n": 5},
    )


def test_a_contract_reads_back_what_was_written(tmp_path):
    data = _prepared()
    data.write(tmp_path)
    back = PreparedData.read(tmp_path)
    assert back == data and back.folder == tmp_path  # where it was read from, not in the file
    assert back.shard_files("train") == [tmp_path / "train-00000-of-00001"]
    ev = _evaluation()
    ev.write(tmp_path / "eval.json")
    assert Evaluation.read(tmp_path / "eval.json") == ev
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["schema"] == "evaluation/1"
    # both scales of the one operating point, named as such (issue 21)
    assert (on_disk["threshold_calibrated"], on_disk["threshold_raw"]) == (0.5, 0.394)
    assert "threshold" not in on_disk


def test_the_same_facts_give_the_same_bytes(tmp_path):
    model = TrainedModel(ModelInput(32, "stretch"), "ab" * 16, 7, {"backbone": "simple_cnn"})
    model.write(tmp_path / "a.json")
    model.write(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ({"image_size": 32, "splits": {}}, "written before genderclf's typed hand-offs"),
        ({"schema": "prepared-data/0", "image_size": 32}, "holds 'prepared-data/0'"),
        ({"schema": "prepared-data/1", "image_size": "big"}, "not a valid prepared-data file"),
    ],
)
def test_an_older_or_broken_file_names_itself_and_the_stage_to_rerun(tmp_path, content, says):
    (tmp_path / "meta.json").write_text(json.dumps(content))
    with pytest.raises(PreparedDataError) as err:
        PreparedData.read(tmp_path)
    message = str(err.value)
    assert says in message and str(tmp_path / "meta.json") in message
    assert "run `dvc repro augment`" in message and "\n" not in message


def test_a_missing_file_names_the_stage_that_writes_it(tmp_path):
    with pytest.raises(ContractError, match=r"model\.json not found: run `dvc repro train`"):
        TrainedModel.read(tmp_path / "model.json")
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro evaluate`"):
        Evaluation.read(tmp_path / "eval.json")
