"""`emloc bench`: accuracy, fidelity (agreement with full ICL) and cost of EMLoC vs baselines."""

from .compare import compare
from .methods import METHODS, Prepared, prepare
from .metrics import accuracy, agreement, wilson_ci
from .run import SUMMARY_FIELDS, BenchError, run_bench

__all__ = [
    "METHODS",
    "SUMMARY_FIELDS",
    "BenchError",
    "Prepared",
    "accuracy",
    "agreement",
    "compare",
    "prepare",
    "run_bench",
    "wilson_ci",
]
