"""Callbacks of the outer Iterative-PPO loop (installed as ``iterppo_lightning.callbacks``).

Each hook receives a ``LoopView`` (iterppo_lightning/loop/view.py), the documented
view of the loop, never the loop itself. The default chain, all at the end of an
iteration, in order: off-policy estimate, evaluation, export, reporting, logging
(the ``loop/`` metrics of the run's experiment loggers), early stopping (when
``model.loop.early_stopping_patience`` is set). Order matters: each
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
with ``state_dict``/``load_state_dict`` gets its state back on ``--resume`` (``callback_states``:
run_state.json keys it by class name, or by ``Name#i`` when the chain holds several of one class).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from .base import IterationCallback
from .early_stopping import EarlyStoppingCallback
from .evaluation import EvaluationCallback, evaluate_policy
from .export import ExportCallback
from .loggers import LoggerCallback
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
        LoggerCallback(),
    ]
    if early_stopping_patience is not None:
        chain.append(EarlyStoppingCallback(patience=early_stopping_patience))
    return chain


def callback_chain(config: LoopConfig) -> list[IterationCallback]:
    """The chain model.loop configures: `callbacks` (None = the default chain), then `extra_callbacks`."""
    chain = default_callbacks(config.early_stopping_patience) if config.callbacks is None else list(config.callbacks)
    return chain + list(config.extra_callbacks)


def callback_state_keys(callbacks: list[IterationCallback]) -> list[str]:
    """The key each callback's state is saved under in run_state.json: its class name when the chain holds one
    callback of that class (the format of runs made before duplicates were possible), else ``Name#i``, i = its
    index among the callbacks of that class (early_stopping_patience plus an EarlyStoppingCallback in
    extra_callbacks, say), so that each gets its own state back on ``--resume``."""
    names = [type(cb).__name__ for cb in callbacks]
    total, seen = Counter(names), Counter()
    keys = []
    for name in names:
        keys.append(name if total[name] == 1 else f"{name}#{seen[name]}")
        seen[name] += 1
    return keys


def callback_states(callbacks: list[IterationCallback]) -> dict[str, Any]:
    """The states to commit: key (``callback_state_keys``) -> ``state_dict()``, for callbacks that have one."""
    keys = callback_state_keys(callbacks)
    return {key: cb.state_dict() for key, cb in zip(keys, callbacks) if hasattr(cb, "state_dict")}


def load_callback_states(callbacks: list[IterationCallback], saved: dict[str, Any]) -> None:
    """Give each callback with ``load_state_dict`` the state ``callback_states`` saved for it (if any)."""
    for key, cb in zip(callback_state_keys(callbacks), callbacks):
        state = saved.get(key)
        if state is not None and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(state)


__all__ = [
    "IterationCallback",
    "OffPolicyEstimateCallback",
    "EvaluationCallback",
    "ExportCallback",
    "ReportingCallback",
    "LoggerCallback",
    "EarlyStoppingCallback",
    "callback_chain",
    "callback_state_keys",
    "callback_states",
    "load_callback_states",
    "default_callbacks",
    "evaluate_policy",
]
