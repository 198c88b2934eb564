"""The model: backbones and layers, fitting, saving and loading, scoring, plots."""
