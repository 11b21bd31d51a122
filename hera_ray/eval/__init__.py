"""Evaluation: data sets read from installed packages, scorers, and (next) the benchmark."""
