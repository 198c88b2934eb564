"""Prefect flows over the DVC pipeline (`flows/dvc_ops.py` is the only caller of DVC)."""
