"""Settings: params.yaml -> typed settings; every bad value fails naming its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from genderclf.config import (
    PATHS,
    Paths,
    Settings,
    SettingsError,
    load_settings,
    parse_settings,
    with_overrides,
)


def _with(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return with_overrides(raw, {key: value})


def _error(raw: Any) -> str:
    with pytest.raises(SettingsError) as info:
        parse_settings(raw)
    return str(info.value)


def test_real_params_file_loads(real_params):
    s = parse_settings(real_params)
    assert s.base.image_size == real_params["base"]["image_size"]
    assert s.validation.min_side == real_params["validate"]["min_side"]
    assert s.flat()["augment.copies"] == real_params["augment"]["copies"]


def test_tiny_settings_are_tiny(tiny_settings):
    assert tiny_settings.base.image_size == 32
    assert tiny_settings.data.sample.num_images == 120
    assert tiny_settings.augment.workers == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("augment.copys", 2),  # misspelt nested key
        ("validate.min_size", 32),
        ("data.sample.num_image", 10),  # two levels down
        ("basee", {"seed": 1}),  # misspelt section
    ],
)
def test_unknown_key_is_named(real_params, key, value):
    msg = _error(_with(real_params, key, value))
    assert f"{key}: unknown key" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("validate.min_side", "big"),
        ("base.seed", "forty-two"),
        ("augment.flip", "sometimes"),
        ("evaluate.slices", "Young"),
        ("augment", [1, 2]),
    ],
)
def test_wrong_type_is_named(real_params, key, value):
    msg = _error(_with(real_params, key, value))
    assert f"  - {key}:" in msg
    assert repr(value) in msg


def _bounds(key: str) -> dict[str, float]:
    """The ge/gt/le/lt constraints declared on a settings field, read from the model."""
    model: Any = Settings
    *parents, last = key.split(".")
    for p in parents:
        model = model.model_fields["validate_" if p == "validate" else p].annotation
    out: dict[str, float] = {}
    for m in model.model_fields[last].metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(m, name, None) is not None:
                out[name] = getattr(m, name)
    return out


_WORDS = {
    "ge": "greater than or equal to",
    "gt": "greater than",
    "le": "less than or equal to",
    "lt": "less than",
}


@pytest.mark.parametrize(
    ("key", "side"),
    [
        ("validate.min_side", "low"),
        ("base.image_size", "low"),
        ("base.image_size", "high"),
        ("augment.rotation_deg", "high"),
        ("data.sample.male_fraction", "high"),
        ("split.val_fraction", "low"),
        ("augment.shard_size", "low"),
    ],
)
def test_out_of_range_is_named(real_params, key, side):
    bounds = _bounds(key)
    name = next(n for n in (("ge", "gt") if side == "low" else ("le", "lt")) if n in bounds)
    limit = bounds[name]
    step = 1 if isinstance(limit, int) else 0.5
    value = {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[name]
    msg = _error(_with(real_params, key, value))
    assert f"  - {key}: Input should be {_WORDS[name]} {limit:g}" in msg
    assert f"(got {value!r})" in msg


def test_bad_literal_lists_allowed_values(real_params):
    msg = _error(_with(real_params, "data.source", "ftp"))
    assert "data.source: allowed values are" in msg
    for allowed in ("sample", "kaggle", "dir", "s3"):
        assert f"'{allowed}'" in msg
    assert "'ftp'" in msg


def test_several_errors_are_all_reported(real_params):
    raw = _with(_with(real_params, "augment.copys", 1), "validate.min_side", -1)
    msg = _error(raw)
    assert "2 invalid setting(s)" in msg
    assert "augment.copys" in msg
    assert "validate.min_side" in msg


def test_dir_source_needs_a_path(real_params):
    msg = _error(_with(_with(real_params, "data.source", "dir"), "data.dir.path", None))
    assert "data.dir.path" in msg


def test_s3_source_needs_a_uri(real_params):
    msg = _error(_with(_with(real_params, "data.source", "s3"), "data.s3.uri", None))
    assert "data.s3.uri" in msg


def test_s3_uri_must_be_an_s3_uri(real_params):
    msg = _error(_with(real_params, "data.s3.uri", "http://bucket/prefix"))
    assert "data.s3.uri" in msg


def test_male_fraction_bounds_must_be_ordered(real_params):
    raw = _with(
        _with(real_params, "validate.male_fraction_min", 0.7), "validate.male_fraction_max", 0.3
    )
    msg = _error(raw)
    assert "validate.male_fraction_min must be <= validate.male_fraction_max" in msg


def test_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in _error([1, 2])


def test_empty_file_names_every_missing_section(tmp_path):
    # params.yaml is the only home of defaults: an empty file is not "all defaults".
    p = tmp_path / "params.yaml"
    p.write_text("")
    with pytest.raises(SettingsError) as info:
        load_settings(p)
    for section in (
        "base",
        "data",
        "validate",
        "split",
        "augment",
        "train",
        "evaluate",
        "register",
        "predict",
    ):
        assert f"  - {section}: missing (every key must be set" in str(info.value)


def test_a_missing_key_is_named(real_params):
    raw = copy.deepcopy(real_params)
    del raw["train"]["lr_head"]
    assert "train.lr_head: missing" in _error(raw)


def _fields(model: type) -> list[tuple[str, Any]]:
    out = []
    for name, f in model.model_fields.items():
        out.append((f"{model.__name__}.{name}", f))
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out += _fields(ann)
    return out


def test_the_code_holds_no_second_copy_of_the_defaults():
    """Every setting is required: the committed params.yaml is the only home of defaults."""
    with_default = [name for name, f in _fields(Settings) if not f.is_required()]
    assert with_default == [], f"settings with a default in code: {with_default}"


def test_every_params_key_is_a_setting_and_every_setting_is_in_params(real_params):
    from genderclf.config import flatten

    settings = parse_settings(real_params)
    assert set(settings.flat()) == set(flatten(real_params))


def test_paths_match_dvc_yaml():
    """The stage outputs dvc.yaml declares are the paths the code writes (`Paths`)."""
    dvc = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())
    declared = set()
    for stage in dvc["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                declared.add(item if isinstance(item, str) else next(iter(item)))
    p = PATHS
    for path in (
        p.raw,
        p.manifest,
        p.validation,
        p.validation_metrics,
        p.splits,
        p.prepared,
        p.augment_preview,
        p.model,
        p.model_info,
        p.train_metrics,
        p.history,
        p.curves,
        p.eval_metrics,
        p.register_report,
        p.reference,
    ):
        assert path.as_posix() in declared, path
    for name in (
        "roc.png",
        "pr.png",
        "calibration.png",
        "slices.png",
        "mistakes.png",
        "confusion_matrix.png",
    ):
        assert (p.plots / name).as_posix() in declared, name
    assert Paths().under("/w").model == Path("/w/models/model.keras")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(SettingsError, match=r"nope\.yaml: settings file not found"):
        load_settings(p)


@pytest.mark.parametrize(
    "text",
    [
        "base: [unclosed\n",
        "base:\n  seed: 1\n bad-indent: 2\n",
        "a: *undefined_alias\n",
    ],
)
def test_non_yaml_file(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(p)


def test_binary_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(p)


@pytest.mark.parametrize(
    "text",
    [
        "base:\n  seed: 2024-13-45\n",  # YAML timestamp with an impossible month
        "base:\n  seed: !!int forty\n",  # explicit tag with a bad scalar
    ],
)
def test_yaml_value_errors_are_settings_errors(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(p)


def test_file_errors_name_the_key(tmp_path, real_params):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(_with(real_params, "augment.copys", 3)))
    with pytest.raises(SettingsError) as info:
        load_settings(p)
    assert str(info.value).startswith(str(p))
    assert "augment.copys: unknown key" in str(info.value)


def test_settings_are_frozen(tiny_settings):
    with pytest.raises(ValueError, match="frozen"):
        tiny_settings.base.seed = 1  # type: ignore[misc]


# --- property: anything in, Settings or SettingsError out ----------------------------------

_SECTION_KEYS = sorted(
    {
        "seed",
        "image_size",
        "source",
        "layout",
        "sample",
        "kaggle",
        "dir",
        "s3",
        "path",
        "uri",
        "endpoint_url",
        "num_images",
        "min_rows",
        "min_side",
        "male_fraction_min",
        "male_fraction_max",
        "strategy",
        "val_fraction",
        "copies",
        "shard_size",
        "backbone",
        "weights",
        "epochs_head",
        "epochs_finetune",
        "slices",
        "min_accuracy",
        "workers",
    }
)
_SECTIONS = ["base", "data", "validate", "split", "augment", "train", "evaluate", "register"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.sampled_from(["s3://bkt/x", "dir", "sample"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_SECTION_KEYS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=8,
)
_sections = st.dictionaries(
    st.sampled_from(_SECTIONS) | st.text(max_size=4) | st.integers(),
    st.dictionaries(st.sampled_from(_SECTION_KEYS) | st.text(max_size=4), _values, max_size=5)
    | _values,
    max_size=5,
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(_sections, _values))
def test_any_mapping_gives_settings_or_settings_error(raw):
    try:
        s = parse_settings(raw)
    except SettingsError as err:
        assert str(err).startswith("params.yaml: ")
    else:
        assert isinstance(s, Settings)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=60) | st.sampled_from(["base:\n  seed: 2020-02-30\n", "a: !!float x"]))
def test_any_file_gives_settings_or_settings_error(tmp_path_factory, text):
    p: Path = tmp_path_factory.mktemp("params") / "params.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        s = load_settings(p)
    except SettingsError as err:
        assert str(p) in str(err)
    else:
        assert isinstance(s, Settings)


@pytest.mark.parametrize(("value", "expected"), [(True, "on"), (False, "off"), ("auto", "auto")])
def test_mixed_precision_accepts_yaml_booleans(real_params, value, expected):
    """`mixed_precision: off` unquoted (or after `dvc exp run -S`) is YAML's False."""
    raw = yaml.safe_load(yaml.safe_dump(real_params))
    raw["train"]["mixed_precision"] = value
    assert parse_settings(raw).train.mixed_precision == expected
