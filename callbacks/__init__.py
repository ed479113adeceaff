"""Callbacks of the outer Iterative-PPO loop (installed as ``iterppo_lightning.callbacks``).

The default chain, in order: collection (start of iteration), evaluation,
checkpointing, reporting, early stopping (end of iteration). Order matters:
each end-of-iteration callback reads what the earlier ones added to the record.
"""

from .base import IterationCallback
from .checkpointing import CheckpointCallback
from .collection import CollectionCallback
from .early_stopping import EarlyStoppingCallback
from .evaluation import EvaluationCallback, evaluate_policy
from .reporting import ReportingCallback


def default_callbacks(early_stopping_patience: int | None = None) -> list[IterationCallback]:
    chain: list[IterationCallback] = [CollectionCallback(), EvaluationCallback(), CheckpointCallback(), ReportingCallback()]
    if early_stopping_patience is not None:
        chain.append(EarlyStoppingCallback(patience=early_stopping_patience))
    return chain


__all__ = [
    "IterationCallback",
    "CollectionCallback",
    "EvaluationCallback",
    "CheckpointCallback",
    "ReportingCallback",
    "EarlyStoppingCallback",
    "default_callbacks",
    "evaluate_policy",
]
