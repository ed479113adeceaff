"""Tests for stats helpers, ReportingCallback and EarlyStoppingCallback."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]

try:
    from iterppo_lightning.callbacks import EarlyStoppingCallback, IterationCallback, ReportingCallback
except ModuleNotFoundError as exc:
    # Before the package is installed (callbacks/ mapped to iterppo_lightning.callbacks),
    # load the folder under that name so these tests run from a bare checkout too.
    if exc.name not in ("iterppo_lightning", "iterppo_lightning.callbacks"):
        raise
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(
        "iterppo_lightning.callbacks",
        ROOT / "callbacks" / "__init__.py",
        submodule_search_locations=[str(ROOT / "callbacks")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    EarlyStoppingCallback = module.EarlyStoppingCallback
    IterationCallback = module.IterationCallback
    ReportingCallback = module.ReportingCallback

from iterppo_lightning.loop.view import LoopView  # noqa: E402
from iterppo_lightning.utils.atomic_io import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from iterppo_lightning.utils.stats import summarize_outcomes, wilson_interval  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers -----------------------------------------------------------------


def make_loop(tmp_path: Path, initial_eval: dict | None = None, num_iterations: int = 3) -> LoopView:
    """The view the loop hands its callbacks, without models: reporting and early stopping read no model."""
    return LoopView(
        run_dir=tmp_path,
        config=SimpleNamespace(iterations=num_iterations),
        seed=0,
        initial_eval=initial_eval,
    )


def make_record(k: int, rate: float) -> dict:
    return {
        "iteration": k,
        "policy": f"pi_{k + 1}",
        "success_rate": rate,
        "ci95": [rate - 0.04, rate + 0.04],
        "mean_return": rate - 0.02,
        "mean_turns": 3.2,
        "eval_episodes": 256,
        "collect": {"episodes": 512, "success_rate": 0.22},
        "critic": {"val_loss": 0.4, "val_brier": 0.1, "val_auroc": 0.8, "val_calibration_error": 0.05},
        "ppo": {"kl": 0.01, "clip_frac": 0.1, "value_loss": 0.02, "entropy": 1.3, "kl_coef": 0.05, "mean_score": 0.4},
        "seconds": {"collect": 3.1, "critic": 5.0, "policy": 20.0, "evaluate": 2.0},
    }


def run_loop(loop: LoopView, callbacks: list[IterationCallback], records: list[dict]) -> dict:
    """Drive the hooks the way the real loop does; returns the summary."""
    for cb in callbacks:
        cb.on_run_start(loop)
    for record in records:
        k = record.get("iteration", len(loop.history))
        for cb in callbacks:
            cb.on_iteration_start(loop, k)
            cb.on_critic_end(loop, k, record.get("critic") or {})
            cb.on_policy_end(loop, k, record.get("ppo") or {})
        for cb in callbacks:
            cb.on_iteration_end(loop, k, record)
        loop.history.append(record)  # only after every on_iteration_end
        if loop.should_stop:
            break
    summary = {"final_policy": f"pi_{len(loop.history)}"}
    for cb in callbacks:
        cb.on_run_end(loop, summary)
    return summary


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def leftovers(folder: Path) -> list[str]:
    """Temporary files left behind by atomic writes."""
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


# -- stats -------------------------------------------------------------------


def wilson_by_formula(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    # (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    p = k / n
    center = p + z**2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    denom = 1 + z**2 / n
    return (center - spread) / denom, (center + spread) / denom


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (81, 100), (10, 10)])
def test_wilson_matches_formula(k: int, n: int) -> None:
    low, high = wilson_interval(k, n)
    exp_low, exp_high = wilson_by_formula(k, n)
    assert low == pytest.approx(max(0.0, exp_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, exp_high), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_published_values() -> None:
    # 5 of 10 at 95%: (0.2366, 0.7634) in the standard tables; 0 of 10 has upper 0.2775.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_wilson_edge_cases() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)


def test_summarize_outcomes() -> None:
    out = summarize_outcomes([True, False, 1, 0], [2, 4, 3, 3], [1.0, 0.0, 1.0, 0.0])
    assert out["success_rate"] == 0.5
    assert out["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert isinstance(out["ci95"], list) and len(out["ci95"]) == 2
    assert out["mean_turns"] == 3.0
    assert out["mean_return"] == 0.5
    assert out["episodes"] == 4
    assert summarize_outcomes([], [], [])["ci95"] == [0.0, 1.0]
    with pytest.raises(ValueError):
        summarize_outcomes([True], [1, 2], [1.0])


def test_atomic_write_roundtrip_leaves_no_temp(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2], "p": Path("/tmp")})
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2], "p": "/tmp"}
    assert leftovers(tmp_path) == []


def test_atomic_write_json_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert leftovers(tmp_path) == []


def test_atomic_path_failure_mid_write_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "curve.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png"
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


# -- reporting ---------------------------------------------------------------


def test_reporting_full_run(tmp_path: Path) -> None:
    initial = {"success_rate": 0.22, "ci95": [0.18, 0.26], "mean_turns": 3.5, "episodes": 256}
    loop = make_loop(tmp_path, initial_eval=initial)
    console = quiet_console()
    records = [make_record(0, 0.41), make_record(1, 0.52), make_record(2, 0.48)]
    summary = run_loop(loop, [ReportingCallback(console=console)], records)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line) for line in lines] == records

    png = (tmp_path / "learning_curve.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert len(png) > 5_000

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["final_policy"] == "pi_3"  # the loop's key is kept
    assert summary["initial_success_rate"] == 0.22
    assert summary["final_success_rate"] == 0.48
    assert summary["final_ci95"] == pytest.approx([0.44, 0.52])
    assert summary["iterations"] == 3
    assert summary["best_iteration"] == 1
    assert summary["best_policy"] == "pi_2"

    out = console.file.getvalue()
    assert "pi_0" in out and "0.220" in out
    rows = [line for line in out.splitlines() if line.split()[:2] in (["0", "pi_1"], ["1", "pi_2"], ["2", "pi_3"])]
    assert len(rows) == 3  # one table line per iteration
    assert len({line.index("pi_") for line in rows}) == 1  # aligned columns
    assert leftovers(tmp_path) == []


def test_reporting_missing_nested_keys(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, initial_eval=None)
    console = quiet_console()
    records = [
        {"iteration": 0, "policy": "pi_1"},
        {"iteration": 1, "policy": "pi_2", "success_rate": 0.3, "critic": {}, "ppo": None, "seconds": {"collect": 1.5}},
        {"iteration": 2, "success_rate": float("nan"), "ci95": [None, 0.5], "critic": {"val_auroc": 0.7}},
    ]
    summary = run_loop(loop, [ReportingCallback(console=console)], records)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # strict JSON: NaN was written as null
    assert len(parsed) == 3 and parsed[2]["success_rate"] is None
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert summary["initial_success_rate"] is None
    assert summary["final_success_rate"] is None
    assert summary["best_iteration"] == 1
    assert summary["iterations"] == 3
    out = console.file.getvalue()
    assert "1.5/-/-/-" in out
    assert "learning curve not drawn" not in out


def test_reporting_zero_iterations_and_silent(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, initial_eval={"success_rate": 0.2}, num_iterations=0)
    console = quiet_console()
    summary = run_loop(loop, [ReportingCallback(print_table=False, console=console)], [])
    assert console.file.getvalue() == ""
    assert summary["iterations"] == 0 and summary["final_success_rate"] is None
    assert summary["best_iteration"] is None and summary["best_policy"] == "pi_0"
    assert json.loads((tmp_path / "summary.json").read_text())["final_policy"] == "pi_0"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_metrics_jsonl_survives_failed_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = make_loop(tmp_path)
    callback = ReportingCallback(print_table=False)
    callback.on_iteration_end(loop, 0, make_record(0, 0.4))
    loop.history.append(make_record(0, 0.4))

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        callback.on_iteration_end(loop, 1, make_record(1, 0.5))
    monkeypatch.undo()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["iteration"] == 0
    assert leftovers(tmp_path) == []


# -- early stopping -------------------------------------------------------------


def stop_iteration(rates: list[float], initial: float | None, **kwargs) -> int | None:
    """Iteration after which the callback asked to stop (None if never)."""
    loop = make_loop(Path("."), initial_eval=None if initial is None else {"success_rate": initial})
    callback = EarlyStoppingCallback(console=quiet_console(), **kwargs)
    callback.on_run_start(loop)
    for k, rate in enumerate(rates):
        callback.on_iteration_end(loop, k, make_record(k, rate))
        if loop.should_stop:
            return k
    return None


def test_early_stopping_triggers_after_patience() -> None:
    # 0.40 improves on pi_0's 0.30; 0.35 and 0.38 do not -> stop after iteration 2.
    assert stop_iteration([0.40, 0.35, 0.38, 0.90], initial=0.30, patience=2) == 2
    # An improvement resets the count.
    assert stop_iteration([0.40, 0.35, 0.45, 0.44, 0.43], initial=0.30, patience=2) == 4
    assert stop_iteration([0.40, 0.35, 0.45, 0.44], initial=0.30, patience=2) is None
    assert stop_iteration([0.40, 0.35, 0.38], initial=0.30, patience=3) is None


def test_early_stopping_counts_initial_eval_and_min_delta() -> None:
    # pi_0 is the best so far, so the first two iterations already count.
    assert stop_iteration([0.50, 0.55], initial=0.60, patience=2) == 1
    assert stop_iteration([0.50, 0.55], initial=None, patience=2) is None
    # Gains of 0.005 are not more than min_delta=0.01.
    assert stop_iteration([0.400, 0.405, 0.410], initial=None, patience=2, min_delta=0.01) == 2
    # A missing metric counts as no improvement.
    loop = make_loop(Path("."), initial_eval={"success_rate": 0.3})
    callback = EarlyStoppingCallback(patience=1, console=quiet_console())
    callback.on_iteration_end(loop, 0, {"iteration": 0})
    assert loop.should_stop


def test_early_stopping_state_dict_roundtrip() -> None:
    loop = make_loop(Path("."), initial_eval={"success_rate": 0.3})
    first = EarlyStoppingCallback(patience=2, console=quiet_console())
    first.on_run_start(loop)
    first.on_iteration_end(loop, 0, make_record(0, 0.5))
    first.on_iteration_end(loop, 1, make_record(1, 0.4))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["best"] == 0.5 and state["best_iteration"] == 0 and state["wait"] == 1

    resumed_loop = make_loop(Path("."), initial_eval={"success_rate": 0.3})
    resumed = EarlyStoppingCallback(patience=2, console=quiet_console())
    resumed.load_state_dict(state)
    resumed.on_run_start(resumed_loop)  # must not reset the restored best
    resumed.on_iteration_end(resumed_loop, 2, make_record(2, 0.45))
    assert resumed_loop.should_stop and resumed.stopped_iteration == 2

    with pytest.raises(ValueError):
        EarlyStoppingCallback(monitor="mean_return").load_state_dict(state)


def test_reporting_shows_the_critic_probe(tmp_path: Path) -> None:
    # model.loop.critic_probe on: its two main numbers in the table and the plot; a record without it shows "-".
    loop = make_loop(tmp_path, initial_eval={"success_rate": 0.2, "ci95": [0.15, 0.25]})
    console = quiet_console()
    records = [make_record(0, 0.3), make_record(1, 0.35), make_record(2, 0.4)]
    records[0]["critic_probe"] = {"within_state_corr": 0.251, "pairwise_acc": 0.674, "spread_ratio": 0.25}
    records[1]["critic_probe"] = {"within_state_corr": -0.125, "pairwise_acc": 0.4, "spread_ratio": 0.5}
    run_loop(loop, [ReportingCallback(console=console)], records)
    out = console.file.getvalue().splitlines()
    header = next(line for line in out if line.startswith("iter"))
    assert header.index("brier") < header.index("qcorr") < header.index("qpair") < header.index("kl")
    rows = {line.split()[0]: line for line in out if line.split()[:2] in (["0", "pi_1"], ["1", "pi_2"], ["2", "pi_3"])}
    assert "0.251  0.674" in rows["0"] and "-0.125  0.400" in rows["1"]
    assert rows["2"][header.index("qcorr") : header.index("qpair") + 5].split() == ["-", "-"]
    assert len({line.index("pi_") for line in rows.values()}) == 1  # still aligned
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "learning curve not drawn" not in console.file.getvalue()


# -- the run's figure (learning_curve.png) -------------------------------------


def figure_for(initial: dict | None, records: list[dict]):
    from iterppo_lightning.callbacks.learning_curve import learning_curve_figure

    fig = learning_curve_figure(initial, records)
    fig.canvas.draw()  # lay out, so legend and axes positions are final
    return fig


def panels(fig) -> list:
    """The figure's panels, top to bottom (a twin KL axis is part of its panel, not a panel)."""
    return [ax for ax in fig.axes if ax.get_title()]


def twin_of(fig, ax):
    return next(other for other in fig.axes if other is not ax and other.bbox.bounds == ax.bbox.bounds)


def assert_legend_clear_of_data(fig, ax) -> None:
    """The panel's legend lies wholly below the panel's plotting area: it covers no data."""
    legend = ax.get_legend()
    assert legend is not None
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0


def test_learning_curve_of_a_simulated_run_has_three_labelled_panels() -> None:
    from iterppo_lightning.callbacks.learning_curve import KL_AXIS_LABEL, KL_LEGEND

    initial = {"success_rate": 0.2, "ci95": list(wilson_interval(20, 100)), "eval_episodes": 100}
    records = [make_record(0, 0.3), make_record(1, 0.4)]
    for record, (k, n) in zip(records, [(30, 100), (40, 100)]):
        record["ci95"] = list(wilson_interval(k, n))
        record["eval_episodes"] = n
        record["ope"] = {"q_policy": 0.5, "q_logged": 0.35, "logged_return": 0.2, "states": 64}
    records[0]["ppo"]["kl"] = -0.004  # the k1 estimate can dip below 0: plotted as logged
    records[1]["ppo"]["kl"] = 0.03
    fig = figure_for(initial, records)
    success, value, training = panels(fig)

    assert "95% Wilson interval over 100 episodes" in success.get_title()
    assert success.get_ylabel() == "success rate"
    low, high = success.get_ylim()
    assert low <= 0.0 and 1.0 <= high <= 1.05  # the whole [0, 1], with a sliver of margin
    assert [t.get_text() for t in success.get_xticklabels()] == ["pi_0", "pi_1", "pi_2"]
    line = success.get_lines()[0]
    assert list(line.get_ydata()) == [0.2, 0.3, 0.4]

    assert "true return" in value.get_title()
    labels = [t.get_text() for t in value.get_legend().get_texts()]
    assert any("ope.q_policy" in label for label in labels) and any("mean_return" in label for label in labels)
    assert any("ope.logged_return" in label for label in labels)

    kl_axis = twin_of(fig, training)
    assert kl_axis.get_ylabel() == KL_AXIS_LABEL and "nats" in KL_AXIS_LABEL
    assert "k1 estimate" in KL_LEGEND
    kl_line = next(line for line in kl_axis.get_lines() if len(line.get_xdata()) == 2)
    assert list(kl_line.get_ydata()) == [-0.004, 0.03]  # not made positive, not hidden
    kl_low, kl_high = kl_axis.get_ylim()
    assert kl_low < -0.004 and kl_high > 0.03  # both points and KL = 0 in view
    assert KL_LEGEND in [t.get_text() for t in training.get_legend().get_texts()]
    for ax in (value, training):
        assert_legend_clear_of_data(fig, ax)


def test_learning_curve_without_evaluation_episodes_plots_the_estimate_against_the_logs() -> None:
    # model.loop.eval_episodes 0 on real logs: no success rate anywhere; the off-policy estimate is the outcome.
    records = []
    for k, (q, logged) in enumerate([(0.47, 0.07), (0.41, 0.0)]):
        record = make_record(k, 0.0)
        for key in ("success_rate", "ci95", "mean_return", "eval_episodes"):
            del record[key]
        record["ope"] = {"q_policy": q, "q_logged": q - 0.02, "logged_return": logged, "states": 64}
        records.append(record)
    fig = figure_for(None, records)
    value, training = panels(fig)  # no empty success panel

    assert value.get_title().startswith("Log-only run")
    series = {t.get_text(): line for t, line in zip(value.get_legend().get_texts(), value.get_lines())}
    assert set(series) == {
        "critic's estimate of pi_k+1 from the logs (ope.q_policy)",
        "critic on the logged replies (ope.q_logged)",
        "return the logged conversations got (ope.logged_return)",
    }
    assert list(series["critic's estimate of pi_k+1 from the logs (ope.q_policy)"].get_ydata()) == [0.47, 0.41]
    assert list(series["return the logged conversations got (ope.logged_return)"].get_ydata()) == [0.07, 0.0]
    low, high = value.get_ylim()
    assert low < 0.0 and high > 1.0  # a return of 0 sits inside the frame
    assert [t.get_text() for t in value.get_xticklabels()] == ["0", "1"]
    assert_legend_clear_of_data(fig, value)
    assert training.get_title() == "Training diagnostics per iteration"


def test_learning_curve_with_nothing_to_show_says_why() -> None:
    # Filtered BC on logs without evaluation: no success rate, no critic, no estimate, no KL.
    records = [{"iteration": 0, "policy": "pi_1", "bc": {"conversations": 64, "successful": 5}}]
    fig = figure_for(None, records)
    success, training = panels(fig)
    notes = " ".join(t.get_text() for ax in (success, training) for t in ax.texts)
    assert "model.loop.eval_episodes 0" in notes
    assert "nothing to plot" in notes
    assert len(fig.axes) == 2  # no KL axis without a KL


def test_bootstrap_interval_hand_worked_and_inside_the_values_range() -> None:
    from iterppo_lightning.experiments.report import mean_ci
    from iterppo_lightning.utils.stats import bootstrap_mean_interval

    # Two seeds a < b: a resampled mean is a (1/4), (a+b)/2 (1/2) or b (1/4), so the 2.5% and 97.5%
    # quantiles of 10,000 resampled means are a and b themselves.
    assert bootstrap_mean_interval([0.2, 0.6]) == (0.2, 0.6)
    assert bootstrap_mean_interval([0.1, 0.1, 0.1]) == (0.1, 0.1)  # no spread, and no round-off past 0.1
    assert bootstrap_mean_interval([0.5]) is None
    # Rates near 0: Student-t leaves [0, 1]; the bootstrap cannot leave the seeds' range.
    rates = [0.0, 0.0, 0.05]
    assert mean_ci(rates)[1] < 0.0
    low, high = bootstrap_mean_interval(rates)
    assert 0.0 <= low <= sum(rates) / 3 <= high <= 0.05
    assert bootstrap_mean_interval(rates) == (low, high)  # seeded: the same figure every time
    with pytest.raises(ValueError):
        bootstrap_mean_interval(rates, level=1.0)


def test_wilson_hand_worked_three_of_ten() -> None:
    # p = 0.3, z^2 = 3.841459: centre (0.3 + 0.192073) / 1.384146 = 0.355507,
    # half (1.959964 / 1.384146) * sqrt(0.021 + 0.009604) = 1.416009 * 0.174939 = 0.247716
    # -> [0.10779, 0.60322] (published tables: 0.1078, 0.6032).
    low, high = wilson_interval(3, 10)
    assert (low, high) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    assert 0.0 <= wilson_interval(1, 2)[0] and wilson_interval(1, 2)[1] <= 1.0
