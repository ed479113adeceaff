"""The three variant seams (loop/variants.py) and the loop's typed view, unit by unit (no training)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from iterppo_lightning.loop.collection import LogBatch
from iterppo_lightning.loop.config import ALGORITHMS, LoopConfig
from iterppo_lightning.loop.run_dir import RunFolder
from iterppo_lightning.loop.variants import (
    BootstrappedTargets,
    CriticTargets,
    FilteredBCImprovement,
    LogSource,
    MyopicTargets,
    OfflineSource,
    PPOImprovement,
    SimulatorSource,
    check_variant_settings,
    choose_critic_targets,
    choose_data_source,
    choose_policy_improvement,
)
from iterppo_lightning.loop.view import LoopView
from iterppo_lightning.modules.critic import CRITIC_TARGETS


def test_the_data_source_follows_logs_and_offline():
    config = LoopConfig(iterations=3, episodes_per_iteration=8)
    batch = LogBatch([], {"kind": "logs", "path": "/logs.jsonl"})
    assert isinstance(choose_data_source(config, "/logs.jsonl", batch), LogSource)
    online = choose_data_source(config, None, None)
    assert type(online) is SimulatorSource and online.episodes == 8
    offline = choose_data_source(LoopConfig(iterations=3, episodes_per_iteration=8, offline=True), None, None)
    assert isinstance(offline, OfflineSource) and offline.episodes == 24  # the whole budget, once


def test_online_sources_pool_earlier_buffers_and_fit_their_own_q(tmp_path):
    folder = RunFolder(tmp_path)
    source = SimulatorSource(8)
    paths, weights = source.training_buffers(folder, 2, [1.0, 0.5, 0.0, 0.25])
    assert paths == [str(tmp_path / "iteration_2" / "buffer"), str(tmp_path / "iteration_1" / "buffer")]
    assert weights == [1.0, 0.5]
    assert source.training_buffers(folder, 0, [1.0, 0.5]) == ([str(tmp_path / "iteration_0" / "buffer")], [1.0])
    assert [source.critic_iteration(k) for k in range(3)] == [0, 1, 2]
    assert not any(source.reuses_collection(k) for k in range(3))


def test_the_offline_source_reuses_buffer_0_and_q0(tmp_path):
    folder, source = RunFolder(tmp_path), OfflineSource(24)
    assert [source.reuses_collection(k) for k in range(3)] == [False, True, True]
    assert source.training_buffers(folder, 2, [1.0]) == ([str(tmp_path / "iteration_0" / "buffer")], [1.0])
    assert [source.critic_iteration(k) for k in range(3)] == [0, 0, 0]


@pytest.mark.parametrize(
    "loop, data, named",
    [
        ({"offline": True}, {"logs": "logs.jsonl", "pool_weights": [1.0]}, "data.logs"),
        ({"offline": True}, {"logs": None, "pool_weights": [1.0, 0.5]}, "data.pool_weights"),
    ],
)
def test_undefined_combinations_are_refused_naming_the_key(loop, data, named):
    system = SimpleNamespace(loop=LoopConfig(**loop))
    with pytest.raises(ValueError, match=named):
        check_variant_settings(system, SimpleNamespace(**data))


def test_every_critic_target_has_a_rule():
    rules = {target: choose_critic_targets(target) for target in CRITIC_TARGETS}
    assert type(rules["mc"]) is CriticTargets and isinstance(rules["myopic"], MyopicTargets)
    assert isinstance(rules["td"], BootstrappedTargets) and not rules["td"].fqe
    assert isinstance(rules["fqe"], BootstrappedTargets) and rules["fqe"].fqe
    critic = SimpleNamespace(td_rounds=3)
    assert [rules[t].refits(critic) for t in ("mc", "myopic", "td", "fqe")] == [0, 0, 3, 3]
    assert rules["mc"].first(None) is None


def test_every_algorithm_has_a_policy_improvement():
    improvements = {name: choose_policy_improvement(name) for name in ALGORITHMS}
    ppo, bc = improvements["iterative_ppo"], improvements["filtered_bc"]
    assert isinstance(ppo, PPOImprovement) and ppo.uses_critic and ppo.record_key == "ppo" and ppo.keeps_optimizer_state
    assert isinstance(bc, FilteredBCImprovement) and not bc.uses_critic and bc.record_key == "bc"
    assert not bc.keeps_optimizer_state


class FakePolicy:
    def __init__(self, kl_anchor: str):
        self.kl_anchor = kl_anchor
        self.pinned: list = []

    def pin_reference(self, pi0_dir=None) -> None:
        self.pinned.append(pi0_dir)


@pytest.mark.parametrize("anchor, pinned", [("pi_0", [None, Path("pi0")]), ("pi_k", [])])
def test_ppo_pins_the_reference_to_pi0_only_with_kl_anchor_pi0(anchor, pinned):
    policy = FakePolicy(anchor)
    PPOImprovement().start(policy)
    PPOImprovement().restore(policy, Path("pi0"))
    assert policy.pinned == pinned
    cloned = FakePolicy(anchor)
    FilteredBCImprovement().start(cloned)
    FilteredBCImprovement().restore(cloned, Path("pi0"))
    assert cloned.pinned == []


def test_the_loop_view_names_the_run_and_its_settings(tmp_path):
    view = LoopView(run_dir=tmp_path, config=LoopConfig(iterations=5), seed=3)
    assert view.num_iterations == 5 and view.iteration_dir(2) == tmp_path / "iteration_2"
    assert view.history == [] and view.initial_eval is None and not view.should_stop
    assert view.critic is None and view.logs is None
    assert RunFolder(tmp_path).iteration_dir(2) == view.iteration_dir(2)  # one layout for both


def test_the_controller_provides_everything_a_seam_may_use(tmp_path):
    """The seams are typed against `PhaseContext`; `OuterLoop` must offer every name of it (and so stay usable)."""
    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.loop.controller import OuterLoop
    from iterppo_lightning.loop.variants import PhaseContext
    from iterppo_lightning.modules.critic import CriticModule
    from iterppo_lightning.modules.policy import PolicyModule
    from iterppo_lightning.system import IterativePPO

    system = IterativePPO(critic=CriticModule(), policy=PolicyModule())
    loop = OuterLoop(system, TrajectoryDataModule(), lambda *a, **k: None, tmp_path / "run")
    loop.view = loop.make_view()  # made when the run opens
    names = set(PhaseContext.__annotations__) | {
        name for name, value in vars(PhaseContext).items() if callable(value) and not name.startswith("_")
    }
    assert names == {
        "system", "datamodule", "folder", "view", "trainer_factory",
        "seed_step", "fit_phase", "load_training_data", "warn", "policy_critic",
    }  # fmt: skip
    missing = sorted(name for name in names if not hasattr(loop, name))
    assert not missing, f"OuterLoop lacks {missing} of PhaseContext"
