"""`resolve_fit_config`: the config `iterppo fit` would run with, returned by a function (no argv, no stdout)."""

from __future__ import annotations

import pytest
import yaml
from cli_helpers import SMOKE, run_inprocess

from iterppo_lightning.commands.lightning_cli import FitConfigError, resolve_fit_config


def test_it_is_what_fit_print_config_prints(capsys):
    printed = run_inprocess(capsys, "fit", "--config", str(SMOKE), "--model.loop.iterations", "3", "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert resolve_fit_config([str(SMOKE)], ["--model.loop.iterations", "3"]) == printed.stdout


def test_later_config_files_then_overrides_win(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  loop:\n    iterations: 5\ndata:\n  gamma: 0.5\n")
    config = yaml.safe_load(resolve_fit_config([str(SMOKE), str(overlay)], ["--data.gamma", "0.7"]))
    base = yaml.safe_load(resolve_fit_config([str(SMOKE)], []))
    assert config["model"]["loop"]["iterations"] == 5 and config["data"]["gamma"] == 0.7
    # Only what the overlay and the override name changed.
    config["model"]["loop"]["iterations"], config["data"]["gamma"] = (
        base["model"]["loop"]["iterations"],
        base["data"]["gamma"],
    )
    assert config == base


def test_a_bad_key_raises_naming_it(tmp_path):
    with pytest.raises(FitConfigError, match="iterationz"):
        resolve_fit_config([str(SMOKE)], ["--model.loop.iterationz", "3"])
    with pytest.raises(FitConfigError, match="no_such_file"):
        resolve_fit_config([str(tmp_path / "no_such_file.yaml")], [])
