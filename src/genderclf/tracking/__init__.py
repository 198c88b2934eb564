"""MLflow, and only here: runs, datasets, logged models, the registry, the served model."""
