"""What a run's JSON files say: strict JSON (null, never NaN), one naming of policies and iterations, paths
relative to the run folder; and the loop/ metrics the logger callback hands the run's logger."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from iterppo_lightning.callbacks import ExportCallback, LoggerCallback, ReportingCallback
from iterppo_lightning.loop.view import LoopView


def strict_json(path: Path):
    def refuse(constant: str):
        raise AssertionError(f"{path} holds bare {constant}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def make_loop(tmp_path: Path, initial: dict | None, logger=None) -> LoopView:
    return LoopView(run_dir=tmp_path, config=SimpleNamespace(iterations=3), seed=0, initial_eval=initial, logger=logger)


def record(k: int, rate: float) -> dict:
    return {
        "iteration": k,
        "policy": f"pi_{k + 1}",
        "success_rate": rate,
        "ci95": [max(rate - 0.1, 0.0), rate + 0.1],
        "critic": {"val_auroc": float("nan"), "val_brier": 0.2},  # AUROC is undefined on a one-class split
        "ope": {"q_policy": 0.3, "q_logged": float("inf")},
        "seconds": {},
    }


def finish(loop: LoopView, callbacks: list, records: list[dict]) -> dict:
    for cb in callbacks:
        cb.on_run_start(loop)
    for rec in records:
        (loop.run_dir / f"iteration_{rec['iteration']}" / "policy").mkdir(parents=True, exist_ok=True)
        for cb in callbacks:
            cb.on_iteration_end(loop, rec["iteration"], rec)
        loop.history.append(rec)
    summary = {"final_policy": "iteration_1/policy"}
    for cb in callbacks:
        cb.on_run_end(loop, summary)
    return summary


@pytest.mark.parametrize(
    ("initial_rate", "rates", "best_policy", "best_iteration"),
    [
        (0.5, [0.2, 0.3], "pi_0", None),  # pi_0 stays best: no iteration made it
        (0.1, [0.2, 0.4], "pi_2", 1),  # iteration 1 made pi_2
        (0.1, [0.4, 0.4], "pi_1", 0),  # a tie: the earliest
    ],
)
def test_best_policy_and_best_iteration_name_the_same_policy(
    tmp_path, initial_rate, rates, best_policy, best_iteration
):
    loop = make_loop(tmp_path, {"success_rate": initial_rate, "ci95": [0.0, 1.0]})
    reporting = ReportingCallback(console=Console(file=io.StringIO()))
    finish(loop, [reporting], [record(k, rate) for k, rate in enumerate(rates)])
    summary = strict_json(tmp_path / "summary.json")
    assert summary["best_policy"] == best_policy and summary["best_iteration"] == best_iteration


def test_metrics_files_are_strict_json_with_null_for_undefined_numbers(tmp_path):
    loop = make_loop(tmp_path, {"success_rate": 0.1})
    callbacks = [ExportCallback(), ReportingCallback(console=Console(file=io.StringIO()))]
    finish(loop, callbacks, [record(0, 0.2), record(1, 0.3)])
    per_iteration = strict_json(tmp_path / "iteration_1" / "metrics.json")
    assert per_iteration["critic"]["val_auroc"] is None and per_iteration["ope"]["q_logged"] is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=pytest.fail)["critic"]["val_auroc"] for line in lines] == [None, None]
    assert strict_json(tmp_path / "summary.json")["final_policy"] == "iteration_1/policy"


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics: dict) -> int:
        self.logged.append(metrics)
        return len(self.logged) - 1


def test_the_logger_callback_logs_pi0_once_then_each_iteration_under_loop(tmp_path):
    logger = RecordingLogger()
    loop = make_loop(tmp_path, {"success_rate": 0.1, "ci95": [0.05, 0.2]}, logger=logger)
    callback = LoggerCallback()
    finish(loop, [callback], [record(0, 0.2), record(1, 0.3)])
    callback.on_run_start(loop)  # a resumed process starts again: pi_0 is not logged twice
    assert [m["loop/policy"] for m in logger.logged] == [0.0, 1.0, 2.0]
    assert logger.logged[0] == {
        "loop/success_rate": 0.1,
        "loop/ci95_low": 0.05,
        "loop/ci95_high": 0.2,
        "loop/policy": 0.0,
    }
    second = logger.logged[2]
    assert second["loop/iteration"] == 1.0 and second["loop/success_rate"] == 0.3
    assert second["loop/ope/q_policy"] == 0.3 and "loop/ope/q_logged" not in second  # inf is left out
    assert "loop/critic/val_auroc" not in second and second["loop/critic/val_brier"] == 0.2
    resumed = LoggerCallback()
    resumed.load_state_dict(callback.state_dict())
    resumed.on_run_start(loop)
    assert len(logger.logged) == 3
