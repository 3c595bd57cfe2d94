"""Tracking: summary.json and Weights & Biases."""
