"""`genderclf predict` over many images: files and folders, or S3 prefixes; in this process,
or on Ray actors when RAY_ADDRESS names a cluster.

Both paths list the images as a stream (a folder walk, S3's paginated listing), cut it
into chunks of `predict.batch_size` images and run `genderclf.inference.predict_images`
on each chunk, so they give the same rows, in input order (each row names its file: the
path as given, or `s3://bucket/key`). On a cluster every actor loads the model once
(sent through Ray's object store: nodes need no access to the MLflow server), chunks go
round the actors with a few in flight per actor, and the driver only lists, writes rows
and never loads TensorFlow: its memory is flat in the number of images (measured by
`benchmarks/cluster.py`). A folder must be on a filesystem every node mounts at the same
path; S3 objects are read by the workers with their node's own credentials.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genderclf.config import PredictSettings, Settings
from genderclf.data.remote import S3Location, S3Object
from genderclf.engine import cluster_address
from genderclf.inference import (
    DEFAULT_THRESHOLD,
    IMAGE_EXTENSIONS,
    PredictError,
    ServingConfig,
    iter_images,
    model_files,
)
from genderclf.io import chunked
from genderclf.monitor.batch import is_s3, walk_images

# Chunks in flight per actor: one running, one waiting, so an actor never idles.
IN_FLIGHT_PER_ACTOR = 2


@dataclass
class Listing:
    """The images of the locations, streamed as (row name, source) pairs; `left_out`
    counts the non-image files of the folders and prefixes once the stream is consumed."""

    locations: list[str]
    endpoint_url: str | None = None
    retries: int = 3
    absolute: bool = False  # sources as absolute paths (for workers on other processes)
    _other: list[Path] = field(default_factory=list)
    _skipped: list[int] = field(default_factory=lambda: [0])

    @property
    def left_out(self) -> int:
        return len(self._other) + self._skipped[0]

    def __iter__(self) -> Iterator[tuple[str, Path | S3Object]]:
        for loc in self.locations:
            if is_s3(loc):
                where = S3Location.of(loc, self.endpoint_url, self.retries)
                for e in walk_images(loc, self._skipped, self.endpoint_url, self.retries):
                    yield where.uri(e.name), S3Object(where, e.name)
            else:
                for p in iter_images([loc], self._other):
                    yield str(p), (p.resolve() if self.absolute else p)


def _settings_for(
    settings: Settings | None, config: ServingConfig | None, model_uri: str
) -> PredictSettings:
    cfg = settings.predict if settings else (config.predict_settings() if config else None)
    if cfg is None:
        raise PredictError(
            f"{model_uri} carries no `predict` settings: run from the project "
            "(with its params.yaml) or pass --params"
        )
    return cfg


def _fallback(settings: Settings | None) -> ServingConfig | None:
    """The serving config of a bare .keras file (size from the model itself)."""
    if settings is None:
        return None
    return ServingConfig(
        0, settings.augment.resize, DEFAULT_THRESHOLD, settings.predict.model_dump()
    )


@dataclass
class PredictRun:
    """The rows of one `genderclf predict`, streamed; `left_out` is final once consumed."""

    rows: Iterator[dict[str, Any]]
    listing: Listing
    engine: str

    @property
    def left_out(self) -> int:
        return self.listing.left_out


def predict(
    locations: list[str],
    model_uri: str,
    settings: Settings | None,
    threshold: float | None = None,
    detect: bool = True,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> PredictRun:
    """Classify the images of `locations` (files, folders, `s3://bucket/prefix`).

    Runs here, or on the Ray cluster RAY_ADDRESS names; the rows are the same.

    Args:
        settings: the project's settings (None: the `predict` section stored with the model).
        threshold: replaces the model's decision threshold.
        detect: find faces (False: classify whole images).
        progress: wraps the stream of images (a progress bar).

    Raises:
        PredictError: no model there, no `predict` settings, no images (when the stream
            ends), or a location that does not exist.
        ClusterError: RAY_ADDRESS names no usable cluster.
    """
    s3 = settings.data.s3 if settings else None
    endpoint = s3.endpoint_url if s3 else None
    retries = s3.retries if s3 else 3
    on_cluster = cluster_address() is not None
    listing = Listing(list(locations), endpoint, retries, absolute=on_cluster)
    images: Iterable[Any] = progress(listing) if progress else listing
    make = _on_cluster if on_cluster else _here
    rows = make(images, model_uri, settings, threshold, detect)
    return PredictRun(_not_empty(rows, locations), listing, "ray" if on_cluster else "local")


def _not_empty(rows: Iterator[dict[str, Any]], locations: list[str]) -> Iterator[dict[str, Any]]:
    n = 0
    for row in rows:
        n += 1
        yield row
    if n == 0:
        raise PredictError(
            f"no images in {', '.join(map(str, locations))} "
            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )


def _here(
    images: Iterable[tuple[str, Any]],
    model_uri: str,
    settings: Settings | None,
    threshold: float | None,
    detect: bool,
) -> Iterator[dict[str, Any]]:
    from genderclf.console import quiet_tensorflow
    from genderclf.inference import make_detector, predict_images
    from genderclf.tracking.serving import load_classifier

    quiet_tensorflow()
    clf = load_classifier(model_uri, threshold, _fallback(settings))
    cfg = _settings_for(settings, clf.config, model_uri)
    detector = make_detector(cfg) if detect else None
    for chunk in chunked(images, cfg.batch_size):
        yield from predict_images(chunk, clf, detector, cfg)


# --- on a Ray cluster -------------------------------------------------------------------------


class Predictor:
    """A Ray actor: the model loaded once, then chunks of images in, rows out."""

    def __init__(
        self,
        files: dict[str, bytes],
        source: str,
        fallback: ServingConfig | None,
        threshold: float | None,
        settings: dict[str, Any],
        detect: bool,
    ):
        from genderclf.console import quiet_tensorflow
        from genderclf.inference import load_local, make_detector, with_threshold

        quiet_tensorflow()
        self._dir = tempfile.TemporaryDirectory(prefix="genderclf-actor-model-")
        root = Path(self._dir.name)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        self.clf = with_threshold(load_local(root, fallback, source), threshold)
        self.settings = PredictSettings.model_validate(settings)
        self.detector = make_detector(self.settings) if detect else None

    def rows(self, chunk: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        from genderclf.inference import predict_images

        return list(predict_images(chunk, self.clf, self.detector, self.settings))


def _model_payload(path: Path) -> dict[str, bytes]:
    """The files an actor needs: the .keras file and its serving.json, by relative name."""
    keras_file, config = model_files(path)
    out = {keras_file.name: keras_file.read_bytes()}
    if config is not None:
        out[config.name] = config.read_bytes()
    return out


def _on_cluster(
    images: Iterable[tuple[str, Any]],
    model_uri: str,
    settings: Settings | None,
    threshold: float | None,
    detect: bool,
) -> Iterator[dict[str, Any]]:
    from genderclf import engine

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genderclf-model-")))
        if Path(model_uri).exists():
            path = Path(model_uri)
        else:
            from genderclf.tracking.serving import fetch_model

            path = fetch_model(model_uri, tmp)
        payload = _model_payload(path)
        config_file = model_files(path)[1]
        config = ServingConfig.read(config_file) if config_file else None
        if config is None and settings is None:
            raise PredictError(
                f"{model_uri} has no serving.json (threshold, resize mode): use a registered "
                "model, or run from the project with its params.yaml"
            )
        cfg = _settings_for(settings, config, model_uri)
        ray = engine.connect()
        model = ray.put(payload)
        del payload
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = gpus or engine.cluster_cpus(ray)
        actor = ray.remote(
            num_cpus=0 if gpus else 1,
            num_gpus=1 if gpus else 0,
            max_restarts=engine.TASK_RETRIES,
            max_task_retries=engine.TASK_RETRIES,
        )(Predictor)
        args = (model, model_uri, _fallback(settings), threshold, cfg.model_dump(), detect)
        actors = [actor.remote(*args) for _ in range(count)]
        stack.callback(lambda: [ray.kill(a) for a in actors])
        submit = (
            actors[i % count].rows.remote(chunk)
            for i, chunk in enumerate(chunked(images, cfg.batch_size))
        )
        for rows in engine.ordered(ray, submit, IN_FLIGHT_PER_ACTOR * count):
            yield from rows


__all__ = ["Listing", "PredictRun", "Predictor", "predict"]
