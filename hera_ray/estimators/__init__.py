"""HERA's estimators behind one small interface (see base.py); trained ones come in issue 4."""

from hera_ray.estimators.base import EstimatorSet

__all__ = ["EstimatorSet"]
