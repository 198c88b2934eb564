"""Gender classifier retraining pipeline."""

__version__ = "0.1.0"
