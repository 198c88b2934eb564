"""The pipeline stages, one module each: `run(settings, paths) -> <Stage>Report`.

A stage reads its inputs, does the work with `data/` and `model/`, writes the outputs of
its contract (ARCHITECTURE.md) and returns a report. It imports no MLflow and no Prefect:
logging a report to MLflow is `genderclf.tracking`'s job, orchestration is `flows/`'s.
"""
