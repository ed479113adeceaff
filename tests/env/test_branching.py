"""Branch conversations: a second reply at a collected state, replayed from the seed, played on to the end."""

from __future__ import annotations

import pytest
import torch

from iterppo_lightning.env.branching import branch_conversations
from iterppo_lightning.env.episodes import episode_seeds, run_episodes
from iterppo_lightning.env.sales_simulator import SalesSimulator, SimulatorConfig
from iterppo_lightning.env.simulator_replay import replay
from iterppo_lightning.loop.config import LoopConfig


@pytest.fixture
def collected(tiny_model, tokenizer):
    torch.manual_seed(0)
    return run_episodes(
        tiny_model, tokenizer, SalesSimulator(), episode_seeds("collect", 0, 0, 12), max_new_tokens=6, policy_id="pi_0"
    )


def _branches(tiny_model, tokenizer, collected, count=10, **kwargs):
    torch.manual_seed(1)
    return branch_conversations(
        tiny_model, tokenizer, SalesSimulator(), collected, count, seed=5, iteration=0, max_new_tokens=6, **kwargs
    )


def test_a_branch_shares_the_state_and_then_goes_its_own_way(tiny_model, tokenizer, collected) -> None:
    branches = _branches(tiny_model, tokenizer, collected)
    originals = {c.conversation_id: c for c in collected}
    assert len(branches) == 10 and len({b.conversation_id for b in branches}) == 10
    for branch in branches:
        info = branch.metadata["branch"]
        original, turn = originals[info["of"]], info["turn"]
        assert branch.conversation_id == f"{original.conversation_id}-b{turn}"
        assert branch.turns[:turn] == original.turns[:turn]
        assert branch.turns[turn].customer == original.turns[turn].customer  # the same state s_turn
        assert branch.turns[-1].terminal and branch.policy_id == "pi_0"
        assert branch.metadata["seed"] == original.metadata["seed"]
        assert "explored_turn" not in branch.metadata


def test_every_state_of_a_branch_replays_from_its_seed(tiny_model, tokenizer, collected) -> None:
    for branch in _branches(tiny_model, tokenizer, collected):
        for turn in branch.agent_turns:
            episode = replay(SimulatorConfig(), branch, turn)
            assert [t.customer for t in episode.conversation.turns] == [t.customer for t in branch.turns[: turn + 1]]


def test_branches_depend_only_on_the_seed_and_a_hot_first_reply_is_recorded(tiny_model, tokenizer, collected) -> None:
    first = _branches(tiny_model, tokenizer, collected)
    assert _branches(tiny_model, tokenizer, collected) == first
    hot = _branches(tiny_model, tokenizer, collected, reply_temperature=3.0)
    assert [b.metadata["explored_turn"] for b in hot] == [b.metadata["branch"]["turn"] for b in hot]
    assert [b.metadata["branch"] for b in hot] == [b.metadata["branch"] for b in first]  # the same states


def test_more_branches_than_states_gives_one_per_state(tiny_model, tokenizer, collected) -> None:
    states = sum(len(c.agent_turns) for c in collected)
    assert len(_branches(tiny_model, tokenizer, collected, count=10 * states)) == states


@pytest.mark.parametrize(
    ("key", "value"), [("branch_fraction", -0.1), ("branch_fraction", 1.0), ("branch_temperature", 0)]
)
def test_bad_branch_settings_are_refused_by_key(key, value) -> None:
    with pytest.raises(ValueError, match=f"model.loop.{key}"):
        LoopConfig(**{key: value})


@pytest.mark.parametrize(
    ("logs", "llm_customer", "named"), [("logs.jsonl", None, "data.logs"), (None, object(), "LLM")]
)
def test_branches_are_refused_where_nothing_can_go_back_to_a_state(logs, llm_customer, named) -> None:
    from types import SimpleNamespace

    from iterppo_lightning.loop.variants import check_variant_settings

    critic = SimpleNamespace(target="mc", ensemble_size=1)
    system = SimpleNamespace(loop=LoopConfig(branch_fraction=0.25), llm_customer=llm_customer, critic=critic)
    system.algorithm = "iterative_ppo"
    datamodule = SimpleNamespace(logs=logs, pool_weights=[1.0], imagined_weight=0.0)
    with pytest.raises(
        ValueError, match=f"model.loop.branch_fraction 0.25 .*{named}.*set model.loop.branch_fraction 0"
    ):
        check_variant_settings(system, datamodule)
    system.loop.branch_fraction = 0.0
    check_variant_settings(system, datamodule)


def test_a_run_with_branches_fits_the_critic_on_their_pairs(tmp_path) -> None:
    import csv

    from cli_helpers import REPO, run_cli

    run_dir = tmp_path / "run"
    proc = run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        "--run_dir",
        str(run_dir),
        "--model.loop.iterations",
        "1",
        "--model.loop.branch_fraction",
        "0.5",
        "--model.critic.branch_contrast_coef",
        "1.0",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        logged = [row["critic/train_contrast_loss"] for row in csv.DictReader(f) if row["critic/train_contrast_loss"]]
    assert logged and all(0.0 <= float(v) <= 4.0 for v in logged)  # the loop's critic batches carried the pairs
