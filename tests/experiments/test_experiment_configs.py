"""configs/experiment/: base.yaml holds what every experiment shares, each other file only what it changes.

The sweep applies the base.yaml beside an experiment first (`--config base.yaml --config EXPERIMENT`) and
never runs base.yaml itself. (When the files were split, every experiment's resolved config was checked
byte for byte against the complete file it replaced.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import REPO

from iterppo_lightning.commands.lightning_cli import resolve_fit_config
from iterppo_lightning.experiments.sweep import BASE_FILE, SweepError, _experiments, plan

FOLDER = REPO / "configs" / "experiment"
BASE = FOLDER / BASE_FILE
OVERLAYS = sorted(p for p in FOLDER.glob("*.yaml") if p.name != BASE_FILE)


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_there_are_seventeen_experiments_and_a_base():
    assert BASE.is_file()
    assert len(OVERLAYS) == 17 and {"iterative_ppo.yaml", "oracle_critic.yaml", "table_critic.yaml"} <= {
        p.name for p in OVERLAYS
    }


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_an_experiment_names_only_what_it_changes(overlay):
    text = overlay.read_text()
    assert text.startswith("# Experiment: "), "a header says what the experiment tests"
    assert f"--config configs/experiment/base.yaml --config configs/experiment/{overlay.name}" in text
    named = leaves(yaml.safe_load(text) or {})
    assert all(not key.startswith(("seed_everything", "trainer.")) for key in named), (
        "shared settings live in base.yaml"
    )
    base = leaves(yaml.safe_load(resolve_fit_config([str(BASE)], [])))
    both = leaves(yaml.safe_load(resolve_fit_config([str(BASE), str(overlay)], [])))
    # A resolved config spells a class's settings under init_args: model.policy.init_args.kl_anchor is the
    # file's model.policy.kl_anchor. Only what the experiment states differs from the base, and it takes effect.
    # (It may state a default when that is what it tests, e.g. critic_td's td_lambda.)
    changed = {key.replace(".init_args.", ".") for key in both if both[key] != base.get(key)}
    resolved = {key.replace(".init_args.", "."): value for key, value in both.items()}
    # A settings group the experiment turns on (e.g. model.loop.critic_probe, null in the base) resolves with its
    # defaults beside the keys it names: those count as named.
    unset_in_base = {key.replace(".init_args.", ".") for key, value in base.items() if value is None}
    groups = {key.rsplit(".", 1)[0] for key in named} & unset_in_base
    assert {key for key in changed if key.rsplit(".", 1)[0] not in groups} <= set(named)
    assert all(resolved[key] == value for key, value in named.items())
    # iterative_ppo changes no setting of the method; it only turns on a measurement (the critic probe).
    assert changed if overlay.stem != "iterative_ppo" else all(".critic_probe." in key for key in changed)


def test_the_sweep_applies_the_base_first_and_never_runs_it(tmp_path):
    experiments = _experiments([str(p) for p in sorted(FOLDER.glob("*.yaml"))], quick=False, share_pi0=True)
    assert [e.name for e in experiments] == [p.stem for p in OVERLAYS]
    assert all(e.base == BASE and e.configs == [BASE, e.path] for e in experiments)
    assert len({e.pi0_key for e in experiments}) == 1, "one shared pi_0 recipe for all of them"
    pi0, runs = plan(experiments[:1], [0], tmp_path / "out")
    config_args = ["--config", str(BASE), "--config", str(experiments[0].path)]
    assert runs[0].args[1:5] == config_args and pi0[0].args[1:5] == config_args


def test_a_folder_with_only_a_base_has_no_experiment(tmp_path):
    (tmp_path / BASE_FILE).write_text(BASE.read_text())
    with pytest.raises(SweepError, match="no experiment"):
        _experiments([str(tmp_path / BASE_FILE)], quick=False, share_pi0=True)


def test_a_bad_key_in_an_overlay_names_the_overlay_and_its_base(tmp_path):
    (tmp_path / BASE_FILE).write_text(BASE.read_text())
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  loop:\n    iterationz: 2\n")
    with pytest.raises(SweepError) as err:
        _experiments([str(tmp_path / BASE_FILE), str(typo)], quick=False, share_pi0=True)
    message = str(err.value)
    assert str(typo) in message and str(tmp_path / BASE_FILE) in message and "iterationz" in message


def test_a_folder_without_a_base_holds_complete_configs(tmp_path):
    complete = tmp_path / "complete.yaml"
    complete.write_text(BASE.read_text())
    [experiment] = _experiments([str(complete)], quick=False, share_pi0=True)
    assert experiment.base is None and experiment.configs == [complete]
    assert Path(experiment.path) == complete
