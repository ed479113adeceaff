"""run_state.json is strict JSON: an undefined metric in the history is written as null and read back."""

from __future__ import annotations

import json

from iterppo_lightning.loop.run_state import RunState, load_run_state, save_run_state


def test_a_nan_in_the_history_is_saved_as_null_and_loads(tmp_path):
    state = RunState(seed=0, history=[{"iteration": 0, "critic": {"val_auroc": float("nan"), "val_brier": 0.2}}])
    state.initial_eval = {"success_rate": 0.0, "mean_return": float("-inf")}
    save_run_state(tmp_path, state)
    text = (tmp_path / "run_state.json").read_text()
    raw = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"bare {c}")))
    assert raw["history"][0]["critic"]["val_auroc"] is None and raw["initial_eval"]["mean_return"] is None
    loaded = load_run_state(tmp_path)
    assert loaded.history[0]["critic"] == {"val_auroc": None, "val_brier": 0.2} and loaded.logger_step == 0
