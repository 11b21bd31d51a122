"""Offline work for the HERA estimators (profiling, PyTorch training); serving uses only its outputs."""
