"""The run folder without training: open a new run, refuse or resume an existing one, save and load module state."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from iterppo_lightning.loop.config import LoopConfig
from iterppo_lightning.loop.run_dir import (
    OpenSettings,
    RunDirError,
    RunFolder,
    new_iteration_record,
    prepare_run_dir,
    write_bootstrap_record,
)
from iterppo_lightning.loop.run_state import RunStateError, load_run_state
from iterppo_lightning.loop.view import LoopView
from iterppo_lightning.modules.critic import CriticModule
from iterppo_lightning.modules.optimizer_carry import OptimizerCarryMixin

CONFIG = "seed_everything: 0\nmodel:\n  loop:\n    iterations: 2\n    critic_epochs: 1\ndata:\n  gamma: 0.9\n"


def settings(**overrides) -> OpenSettings:
    return OpenSettings(**{"seed": 7, "config_text": CONFIG, **overrides})


def open_folder(path, **overrides) -> RunFolder:
    folder = RunFolder(path)
    folder.open_on_every_rank(settings(**overrides), carried={})
    return folder


def test_a_new_run_writes_its_state_and_config(tmp_path):
    run_dir = tmp_path / "run"
    folder = RunFolder(run_dir)
    opened = folder.open_on_every_rank(settings(), carried={})
    assert opened.logs is None and opened.log_batch is None
    state = load_run_state(run_dir)
    assert state.seed == 7 and state.mode == "simulator" and not state.pi0_ready and state.completed_iterations == 0
    assert (run_dir / "config.yaml").read_text() == CONFIG
    assert folder.policy_dir(0) == run_dir / "pi_0" / "policy"
    assert folder.policy_dir(2) == run_dir / "iteration_1" / "policy"
    assert RunFolder(run_dir, policy_init="/given/pi0").policy_dir(0).as_posix() == "/given/pi0"
    assert folder.pi0_dir == run_dir / "pi_0"
    assert (
        folder.begin_iteration(0, None).record
        == new_iteration_record(0)
        == {"iteration": 0, "policy": "pi_1", "seconds": {}}
    )


def test_the_loop_view_reads_the_run_folders_layout(tmp_path):
    class Moved(RunFolder):
        def iteration_dir(self, k):
            return self.path / "elsewhere" / str(k)

    config = LoopConfig(iterations=2)
    assert LoopView(run_dir=tmp_path, config=config, seed=0).iteration_dir(3) == RunFolder(tmp_path).iteration_dir(3)
    assert LoopView(run_dir=tmp_path, config=config, seed=0, folder=Moved(tmp_path)).iteration_dir(3) == (
        tmp_path / "elsewhere" / "3"
    )


def test_one_writer_of_bootstrap_json_fit_s_format_unchanged_and_the_command_adds_its_seed(tmp_path):
    write_bootstrap_record(tmp_path, 12.5, 64)  # fit: the text the run wrote before
    assert (tmp_path / "bootstrap.json").read_text() == '{"seconds": 12.5, "episodes": 64}\n'
    write_bootstrap_record(tmp_path, 12.5, 64, seed=3)  # iterppo bootstrap
    assert json.loads((tmp_path / "bootstrap.json").read_text()) == {"seconds": 12.5, "episodes": 64, "seed": 3}


def test_a_failing_preflight_creates_no_run_dir(tmp_path):
    def bad_model():
        raise FileNotFoundError("model.policy_init: no such folder")

    with pytest.raises(FileNotFoundError, match="policy_init"):
        RunFolder(tmp_path / "run").open_on_every_rank(settings(), carried={}, preflight=bad_model)
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_refused_without_resume(tmp_path):
    open_folder(tmp_path / "run")
    with pytest.raises(RunDirError, match="--resume true"):
        open_folder(tmp_path / "run")


def test_a_folder_with_other_files_is_refused_and_temporaries_do_not_count(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds files"):
        prepare_run_dir(tmp_path / "other")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".run_state.x.tmp.json").write_text("{")  # a first commit cut short
    prepare_run_dir(tmp_path / "killed")
    assert list((tmp_path / "killed").iterdir()) == []


def test_resume_refuses_a_changed_config_naming_the_key_and_allows_it_when_asked(tmp_path):
    open_folder(tmp_path / "run")
    changed = CONFIG.replace("critic_epochs: 1", "critic_epochs: 3")
    with pytest.raises(RunStateError, match=r"model\.loop\.critic_epochs: 1 -> 3"):
        open_folder(tmp_path / "run", resume=True, config_text=changed)
    assert (tmp_path / "run" / "config.yaml").read_text() == CONFIG
    open_folder(tmp_path / "run", resume=True, config_text=changed, allow_config_change=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == changed


def test_resume_refuses_a_changed_phase_precision(tmp_path):
    # A phase's precision changes its float rounding, so what the rest of the run learns.
    open_folder(tmp_path / "run")
    with pytest.raises(RunStateError, match=r"critic_precision: None -> 'bf16-mixed'"):
        open_folder(tmp_path / "run", resume=True, config_text=CONFIG + "critic_precision: bf16-mixed\n")


def test_resume_accepts_the_resumable_changes_and_removes_stale_temporaries(tmp_path):
    open_folder(tmp_path / "run")
    stale = tmp_path / "run" / "iteration_0" / ".critic.abc.tmp.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    more = CONFIG.replace("iterations: 2", "iterations: 5")
    open_folder(tmp_path / "run", resume=True, config_text=more)
    assert not stale.exists()
    assert (tmp_path / "run" / "config.yaml").read_text() == more


def test_begin_and_finish_iteration_commit_the_record_and_the_lineage(tmp_path):
    folder = open_folder(tmp_path / "run")
    progress = folder.begin_iteration(0, logs=None)
    assert folder.begin_iteration(0, logs=None) is progress  # the interrupted iteration's own record
    assert progress.source == {"kind": "simulator"}
    assert progress.record == {"iteration": 0, "policy": "pi_1", "seconds": {}}
    progress.record["success_rate"] = 0.5
    folder.finish_iteration(progress, [progress.record], stopped=True, callback_states={"Cb": {"wait": 1}})
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["completed_iterations"] == 1 and state["in_progress"] is None
    assert state["history"] == [{"iteration": 0, "policy": "pi_1", "seconds": {}, "success_rate": 0.5}]
    lineage = {"iteration": 0, "trained": "pi_0", "exported": "pi_1", "source": {"kind": "simulator"}}
    assert state["lineage"] == [lineage]
    assert state["finished"] and state["stopped_early"] and state["callbacks"] == {"Cb": {"wait": 1}}


class TinyCarried(OptimizerCarryMixin, L.LightningModule):
    """A module with the critic's save/load surface (build, state_dict, carried optimizer state)."""

    def __init__(self, keep_optimizer_state: bool = True):
        super().__init__()
        self.keep_optimizer_state = keep_optimizer_state
        self.layer: nn.Linear | None = None

    def build(self, base_model_dir) -> None:
        self.layer = nn.Linear(2, 1)
        self.carried_optimizer_state = None


def test_the_critic_and_the_policy_optimizer_state_round_trip_through_the_folder(tmp_path):
    folder = open_folder(tmp_path / "run")
    saved = TinyCarried()
    saved.build(None)
    adam = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    saved.carried_optimizer_state = adam
    folder.save_critic(saved, 0)
    loaded = TinyCarried()
    RunFolder.load_critic(loaded, folder.critic_file(0), base_model_dir=None)
    assert torch.equal(loaded.layer.weight, saved.layer.weight)
    assert loaded.carried_optimizer_state["state"][0]["step"] == 3.0

    folder.save_policy_optimizer_state(saved, 0)
    assert folder.policy_optimizer_file(0).exists()
    policy = TinyCarried()
    RunFolder.load_optimizer_state(policy, folder.policy_optimizer_file(0))
    assert policy.carried_optimizer_state["param_groups"] == adam["param_groups"]
    without = TinyCarried(keep_optimizer_state=False)
    RunFolder.load_optimizer_state(without, folder.policy_optimizer_file(0))
    assert without.carried_optimizer_state is None  # not kept: a fit starts with fresh moments


def test_optimizer_carry_has_a_public_api_on_the_real_modules(tmp_path):
    critic = CriticModule(keep_optimizer_state=True)
    assert critic.carried_optimizer_state is None
    critic.carried_optimizer_state = {"state": {}, "param_groups": []}
    assert critic.carried_optimizer_state == {"state": {}, "param_groups": []}
    critic.resume_from_zero_checkpoint(tmp_path / "critic_zero")
    assert critic._zero_checkpoint_in == str(tmp_path / "critic_zero")
    critic.resume_from_zero_checkpoint(None)
    assert critic._zero_checkpoint_in is None


def test_a_key_the_saved_config_lacks_counts_as_its_default_when_defaults_are_given():
    from iterppo_lightning.loop.run_state import config_differences

    saved = "model:\n  loop:\n    iterations: 2\n"
    defaults = "model:\n  loop:\n    iterations: 4\n    explore_prob: 0.0\n    probe: null\n"
    same = "model:\n  loop:\n    iterations: 2\n    explore_prob: 0.0\n    probe: null\n"
    assert config_differences(saved, same, set(), defaults) == []
    # Without defaults (or with another value) the key is a change.
    assert config_differences(saved, same, set()) == ["model.loop.explore_prob: None -> 0.0"]
    changed = "model:\n  loop:\n    iterations: 2\n    explore_prob: 0.1\n    probe: {states: 24}\n"
    assert config_differences(saved, changed, set(), defaults) == [
        "model.loop.explore_prob: not in the saved config (default 0.0) -> 0.1",
        "model.loop.probe.states: not in the saved config (default None) -> 24",
    ]
    # A key the saved config holds is compared as before, defaults or not.
    assert config_differences(same, changed, set(), defaults)[0] == "model.loop.explore_prob: 0.0 -> 0.1"
