"""Drift monitoring: a new batch of images against what the champion was evaluated on."""
