"""Hyper-parameter search with Ray Tune + Optuna: the spec (YAML), the trial, the run, its report."""
