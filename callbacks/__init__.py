"""Callbacks of the outer Iterative-PPO loop (installed as ``iterppo_lightning.callbacks``).

The default chain, all at the end of an iteration, in order: off-policy
estimate, evaluation, export, reporting, early stopping. Order matters: each
callback reads what the earlier ones added to the record. Collection and the
state a resume needs are the loop's own steps (outer_loop.py), not callbacks.
"""

from .base import IterationCallback
from .early_stopping import EarlyStoppingCallback
from .evaluation import EvaluationCallback, evaluate_policy
from .export import ExportCallback
from .off_policy_estimate import OffPolicyEstimateCallback
from .reporting import ReportingCallback


def default_callbacks(early_stopping_patience: int | None = None) -> list[IterationCallback]:
    chain: list[IterationCallback] = [OffPolicyEstimateCallback(), EvaluationCallback(), ExportCallback(), ReportingCallback()]
    if early_stopping_patience is not None:
        chain.append(EarlyStoppingCallback(patience=early_stopping_patience))
    return chain


__all__ = [
    "IterationCallback",
    "OffPolicyEstimateCallback",
    "EvaluationCallback",
    "ExportCallback",
    "ReportingCallback",
    "EarlyStoppingCallback",
    "default_callbacks",
    "evaluate_policy",
]
