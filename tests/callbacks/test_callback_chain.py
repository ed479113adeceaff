"""The callback chain from YAML (model.loop.callbacks / extra_callbacks), through the real command line's parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import SMOKE, run_inprocess

from iterppo_lightning.callbacks import (
    EarlyStoppingCallback,
    EvaluationCallback,
    ExportCallback,
    IterationCallback,
    LoggerCallback,
    OffPolicyEstimateCallback,
    ReportingCallback,
    callback_chain,
    callback_state_keys,
    callback_states,
    load_callback_states,
)
from iterppo_lightning.loop.config import LoopConfig
from iterppo_lightning.loop.view import LoopView

DEFAULT_CHAIN = [OffPolicyEstimateCallback, EvaluationCallback, ExportCallback, ReportingCallback, LoggerCallback]


class RecordingCallback(IterationCallback):
    """A user's callback: notes every hook it saw, with the type of what the loop handed it, in the run folder."""

    def __init__(self, tag: str = "user") -> None:
        self.tag = tag
        self.seen: list[str] = []

    def _note(self, loop, hook: str) -> None:
        self.seen.append(f"{hook}:{type(loop).__name__}")

    def on_run_start(self, loop: LoopView) -> None:
        self._note(loop, "run_start")

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        self._note(loop, f"iteration_end_{iteration}")
        record[self.tag] = sorted(k for k in record if k != self.tag)  # what the earlier callbacks recorded

    def on_run_end(self, loop: LoopView, summary: dict) -> None:
        self._note(loop, "run_end")
        (loop.run_dir / f"{self.tag}.json").write_text(json.dumps(self.seen))


def parse(tmp_path: Path, yaml_text: str, *args: str):
    """The CLI's parser and instantiation (IterPPOCLI, run=False): the objects `fit` would get."""
    import sys

    from iterppo_lightning.commands.lightning_cli import build_cli

    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml_text)
    argv, sys.argv = sys.argv, ["iterppo"]  # as if typed in a shell (pytest's own argv is not ours)
    try:
        return build_cli(["--config", str(SMOKE), "--config", str(extra), *args], run=False)
    finally:
        sys.argv = argv


def chain_of(cli, tmp_path: Path) -> list[IterationCallback]:
    from iterppo_lightning.loop.controller import OuterLoop

    return OuterLoop(cli.model, cli.datamodule, lambda *a, **k: None, tmp_path / "run", callbacks=None).callbacks


def test_the_default_chain_is_todays(tmp_path):
    assert [type(cb) for cb in callback_chain(LoopConfig())] == DEFAULT_CHAIN
    chain = callback_chain(LoopConfig(early_stopping_patience=2))
    assert [type(cb) for cb in chain] == [*DEFAULT_CHAIN, EarlyStoppingCallback] and chain[-1].patience == 2
    cli = parse(tmp_path, "model:\n  loop:\n    early_stopping_patience: 3\n")
    assert [type(cb) for cb in chain_of(cli, tmp_path)] == [*DEFAULT_CHAIN, EarlyStoppingCallback]


def test_yaml_adds_a_user_callback_after_the_default_chain(tmp_path):
    yaml_text = (
        "model:\n  loop:\n    extra_callbacks:\n"
        "      - class_path: test_callback_chain.RecordingCallback\n        init_args:\n          tag: mine\n"
    )
    chain = chain_of(parse(tmp_path, yaml_text), tmp_path)
    assert [type(cb).__name__ for cb in chain] == [c.__name__ for c in DEFAULT_CHAIN] + ["RecordingCallback"]
    assert chain[-1].tag == "mine"


def test_yaml_replaces_the_chain(tmp_path):
    yaml_text = (
        "model:\n  loop:\n    callbacks:\n"
        "      - class_path: iterppo_lightning.callbacks.ExportCallback\n"
        "      - class_path: iterppo_lightning.callbacks.EarlyStoppingCallback\n"
        "        init_args:\n          patience: 4\n          monitor: mean_return\n"
    )
    chain = chain_of(parse(tmp_path, yaml_text), tmp_path)
    assert [type(cb) for cb in chain] == [ExportCallback, EarlyStoppingCallback]
    assert chain[1].patience == 4 and chain[1].monitor == "mean_return"


def test_a_replaced_chain_with_early_stopping_patience_is_refused_naming_both_keys(tmp_path, capsys):
    config = tmp_path / "both.yaml"
    config.write_text(
        "model:\n  loop:\n    early_stopping_patience: 2\n    callbacks:\n"
        "      - class_path: iterppo_lightning.callbacks.ExportCallback\n"
    )
    run_dir = tmp_path / "run"
    proc = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--config", str(config), "--run_dir", str(run_dir))
    assert proc.returncode != 0
    assert "model.loop.early_stopping_patience" in proc.stderr and "model.loop.callbacks" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_two_callbacks_of_one_class_keep_their_own_state_across_a_resume():
    # early_stopping_patience plus an EarlyStoppingCallback in extra_callbacks: two of one class in the chain.
    config = LoopConfig(early_stopping_patience=3, extra_callbacks=[EarlyStoppingCallback(monitor="ope.q_policy")])
    chain = callback_chain(config)
    keys = callback_state_keys(chain)
    # A class that appears once keeps its bare name: run_state.json of existing runs reads back unchanged.
    assert keys == [cb.__name__ for cb in DEFAULT_CHAIN] + ["EarlyStoppingCallback#0", "EarlyStoppingCallback#1"]
    first, second = chain[-2:]
    first.best, first.best_iteration, first.wait = 0.5, 1, 2
    second.best, second.best_iteration, second.wait = -3.0, 0, 1
    saved = json.loads(json.dumps(callback_states(chain)))  # as committed to run_state.json
    assert set(saved) == {"EarlyStoppingCallback#0", "EarlyStoppingCallback#1", "LoggerCallback"}
    resumed = callback_chain(config)
    load_callback_states(resumed, saved)
    assert [(cb.best, cb.best_iteration, cb.wait) for cb in resumed[-2:]] == [(0.5, 1, 2), (-3.0, 0, 1)]
    assert [cb.monitor for cb in resumed[-2:]] == [first.monitor, "ope.q_policy"]
    # A run saved before duplicates were possible: one early-stopping callback, keyed by its class name.
    single = callback_chain(LoopConfig(early_stopping_patience=3))
    load_callback_states(single, {"EarlyStoppingCallback": saved["EarlyStoppingCallback#0"]})
    assert (single[-1].best, single[-1].wait) == (0.5, 2)


@pytest.mark.slow
def test_a_user_callback_from_yaml_runs_in_a_real_fit_and_sees_the_loop_view(tmp_path, capsys):
    config = tmp_path / "user.yaml"
    config.write_text(
        "model:\n  loop:\n    iterations: 1\n    eval_greedy_also: true\n    extra_callbacks:\n"
        "      - class_path: test_callback_chain.RecordingCallback\n"
    )
    run_dir = tmp_path / "run"
    proc = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--config", str(config), "--run_dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((run_dir / "user.json").read_text())
    assert seen == ["run_start:LoopView", "iteration_end_0:LoopView", "run_end:LoopView"]
    record = json.loads((run_dir / "run_state.json").read_text())["history"][0]
    # It ran last: every default callback had written its part of the record (ope, evaluation).
    assert {"ope", "success_rate", "greedy_success_rate", "critic", "ppo"} <= set(record["user"])
    # eval_greedy_also: greedy decoding on the same customers, beside the sampled rate.
    assert 0.0 <= record["greedy_success_rate"] <= 1.0 and len(record["greedy_ci95"]) == 2
