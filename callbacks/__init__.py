"""Callbacks of the outer Iterative-PPO loop (installed as ``iterppo_lightning.callbacks``).

Each hook receives a ``LoopView`` (iterppo_lightning/loop/view.py), the documented
view of the loop, never the loop itself. The default chain, all at the end of an
iteration, in order: off-policy estimate, evaluation, export, reporting, early
stopping (when ``model.loop.early_stopping_patience`` is set). Order matters: each
callback reads what the earlier ones added to the record. Collection and the
state a resume needs are the loop's own steps (loop/controller.py), not callbacks.

The chain is configured under ``model.loop`` with class_path/init_args entries::

    model:
      loop:
        extra_callbacks:          # appended after the chain
          - class_path: mypackage.MyCallback
            init_args: {every: 2}
        callbacks:                # replaces the default chain (null = default)
          - class_path: iterppo_lightning.callbacks.EvaluationCallback
          - class_path: iterppo_lightning.callbacks.ExportCallback
          - class_path: iterppo_lightning.callbacks.EarlyStoppingCallback
            init_args: {patience: 3}

A callback subclasses ``IterationCallback`` and overrides the hooks it needs; one
with ``state_dict``/``load_state_dict`` gets its state back on ``--resume``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import IterationCallback
from .early_stopping import EarlyStoppingCallback
from .evaluation import EvaluationCallback, evaluate_policy
from .export import ExportCallback
from .off_policy_estimate import OffPolicyEstimateCallback
from .reporting import ReportingCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.config import LoopConfig


def default_callbacks(early_stopping_patience: int | None = None) -> list[IterationCallback]:
    chain: list[IterationCallback] = [
        OffPolicyEstimateCallback(),
        EvaluationCallback(),
        ExportCallback(),
        ReportingCallback(),
    ]
    if early_stopping_patience is not None:
        chain.append(EarlyStoppingCallback(patience=early_stopping_patience))
    return chain


def callback_chain(config: LoopConfig) -> list[IterationCallback]:
    """The chain model.loop configures: `callbacks` (None = the default chain), then `extra_callbacks`."""
    chain = default_callbacks(config.early_stopping_patience) if config.callbacks is None else list(config.callbacks)
    return chain + list(config.extra_callbacks)


__all__ = [
    "IterationCallback",
    "OffPolicyEstimateCallback",
    "EvaluationCallback",
    "ExportCallback",
    "ReportingCallback",
    "EarlyStoppingCallback",
    "callback_chain",
    "default_callbacks",
    "evaluate_policy",
]
