"""Analyses of trained models (they load weights, so they sit above the engine and the reports)."""
