"""TD(lambda) / FQE critic targets (critic_targets.py) and pooled-buffer weights."""

from __future__ import annotations

import pytest
import torch

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.modules.critic import CriticModule
from iterppo_lightning.rl.critic_targets import lambda_return_targets, myopic_targets


def three_turn_success() -> Conversation:
    agent = dict(suggestion="x", sent="x", business_action="accept")
    return Conversation("c", [Turn("a", **agent), Turn("b", **agent), Turn("d", **agent), Turn("bought", outcome=1)])


def test_lambda_one_is_the_monte_carlo_return(conversations):
    targets = lambda_return_targets(conversations, {}, gamma=0.9, lam=1.0)
    for conv in conversations:
        assert [targets[(conv.conversation_id, t)] for t in conv.agent_turns] == pytest.approx(conv.returns(0.9))


def test_td_lambda_by_hand():
    # y2 = 1 (the next message ends it with a sale); y1 = 0.9 * (0.5 * Q(t2) + 0.5 * y2); y0 likewise.
    next_q = {("c", 1): 0.4, ("c", 2): 0.6}
    targets = lambda_return_targets([three_turn_success()], next_q, gamma=0.9, lam=0.5)
    assert targets[("c", 2)] == pytest.approx(1.0)
    assert targets[("c", 1)] == pytest.approx(0.9 * (0.5 * 0.6 + 0.5 * 1.0))
    assert targets[("c", 0)] == pytest.approx(0.9 * (0.5 * 0.4 + 0.5 * 0.72))


def test_td_zero_bootstraps_on_the_next_q_only():
    next_q = {("c", 1): 0.4, ("c", 2): 0.6}
    targets = lambda_return_targets([three_turn_success()], next_q, gamma=0.9, lam=0.0)
    assert [targets[("c", t)] for t in range(3)] == pytest.approx([0.36, 0.54, 1.0])


def test_a_failed_conversation_bootstraps_to_zero_at_its_end():
    agent = dict(suggestion="x", sent="x", business_action="accept")
    conv = Conversation("f", [Turn("a", **agent), Turn("bye")])
    assert lambda_return_targets([conv], {}, gamma=0.9, lam=0.0) == {("f", 0): 0.0}


def test_myopic_targets_see_only_the_current_turns_reward():
    # Three agent turns, the sale after the third: only that reply's next message brings the outcome.
    assert myopic_targets([three_turn_success()]) == {("c", 0): 0.0, ("c", 1): 0.0, ("c", 2): 1.0}
    agent = dict(suggestion="x", sent="x", business_action="accept")
    failed = Conversation("f", [Turn("a", **agent), Turn("b", **agent), Turn("bye")])
    assert myopic_targets([failed]) == {("f", 0): 0.0, ("f", 1): 0.0}


def test_myopic_targets_are_the_gamma_zero_return_and_validation_keeps_monte_carlo(conversations, tokenizer):
    from iterppo_lightning.data.datamodule import TrajectoryDataModule

    targets = myopic_targets(conversations)
    # The same as TD with gamma = 0 (no bootstrap, no later turn).
    assert targets == lambda_return_targets(conversations, {}, gamma=0.0, lam=1.0)
    assert any(v == 1.0 for v in targets.values()) and any(
        g > 0
        for c in conversations
        for t, g in zip(c.agent_turns, c.returns(0.9))
        if targets[(c.conversation_id, t)] == 0.0
    ), "the fixture must hold replies whose success came later (their MC return > 0, myopic target 0)"
    dm = TrajectoryDataModule(gamma=0.9, val_fraction=0.3)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    mc = {(e.conversation_id, e.turn_index): e.target for e in dm.val_examples}
    dm.set_targets(targets)
    assert all(e.target == targets[(e.conversation_id, e.turn_index)] for e in dm.train_examples)
    assert all(e.target == mc[(e.conversation_id, e.turn_index)] for e in dm.val_examples)


def test_bootstrap_counts_are_poisson_one_per_member_and_conversation(conversations, tokenizer):
    from collections import Counter

    from iterppo_lightning.data.datamodule import TrajectoryDataModule, bootstrap_count

    draws = [bootstrap_count(f"conv-{i}", 0, 0) for i in range(4000)]
    counts = Counter(draws)
    # Poisson(1): P(0) = P(1) = e^-1 = 0.368, P(2) = 0.184, P(3) = 0.061; mean 1.
    assert sum(draws) / len(draws) == pytest.approx(1.0, abs=0.05)
    assert counts[0] / 4000 == pytest.approx(0.368, abs=0.03) and counts[2] / 4000 == pytest.approx(0.184, abs=0.03)
    assert bootstrap_count("conv-1", 0, 0) == bootstrap_count("conv-1", 0, 0)  # deterministic
    assert [bootstrap_count(f"conv-{i}", 0, 0) for i in range(50)] != [
        bootstrap_count(f"conv-{i}", 1, 0) for i in range(50)
    ]
    dm = TrajectoryDataModule(val_fraction=0.0, critic_batch_size=1000)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    assert "bootstrap" not in next(iter(dm.train_dataloader()))  # one critic: batches as before
    dm.bootstrap_members = 2
    batch = _unshuffled_critic_batch(dm)
    assert batch["bootstrap"].tolist() == [
        [bootstrap_count(e.conversation_id, m, 0) for e in dm.train_examples] for m in range(2)
    ]
    dm.use_phase("sft")
    assert "bootstrap" not in next(iter(dm.train_dataloader()))


def _unshuffled_critic_batch(dm) -> dict:
    """One critic batch of every training example, in the data module's order (no shuffling)."""
    return dm._collate_pairs(dm.train_examples)


def test_critic_loss_weights_pooled_examples():
    critic = CriticModule()
    logits = torch.tensor([0.0, 2.0])
    target = torch.tensor([1.0, 0.0])
    weight = torch.tensor([1.0, 0.25])
    per_example = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    assert critic._loss(logits, target, weight) == pytest.approx(float((per_example * weight).mean()))
    assert critic._loss(logits, target) == pytest.approx(float(per_example.mean()))


def test_pooled_buffers_carry_their_weight_into_critic_batches(tmp_path, conversations, tokenizer):
    from iterppo_lightning.data.buffer import save_buffer
    from iterppo_lightning.data.datamodule import TrajectoryDataModule

    old = save_buffer(conversations[:20], tmp_path / "old")
    new = save_buffer(conversations[20:], tmp_path / "new")
    dm = TrajectoryDataModule(val_fraction=0.0, critic_batch_size=1000)
    dm.connect(tokenizer)
    dm.load_buffers([str(new), str(old)], [1.0, 0.25])
    batch = next(iter(dm.train_dataloader()))
    old_ids = {c.conversation_id for c in conversations[:20]}
    raw = [0.25 if e.conversation_id in old_ids else 1.0 for e in dm.train_examples]
    # Divided by the data's mean weight: a batch of old examples counts less than a batch of new ones.
    assert sorted(batch["weight"].tolist()) == pytest.approx(sorted(w * len(raw) / sum(raw) for w in raw))
    # Unpooled data keeps unweighted batches (the plain mean).
    dm.load_buffers([str(new)])
    assert "weight" not in next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("bad", [[], [0.0], [1.0, -0.5]])
def test_bad_pool_weights_are_named(bad):
    from iterppo_lightning.data.datamodule import TrajectoryDataModule

    with pytest.raises(ValueError, match="data.pool_weights"):
        TrajectoryDataModule(pool_weights=bad)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"target": "sarsa"}, "critic.target"),
        ({"td_lambda": 1.5}, "critic.td_lambda"),
        ({"td_rounds": 0}, "critic.td_rounds"),
    ],
)
def test_bad_critic_target_settings_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        CriticModule(**kwargs)


@pytest.mark.parametrize("target", ["td", "fqe"])
def test_bootstrapped_targets_with_pooled_buffers_run_end_to_end(tmp_path, target):
    import json

    from cli_helpers import SMOKE, run_cli

    run_dir = tmp_path / "run"
    proc = run_cli(
        "fit",
        "--config",
        str(SMOKE),
        "--run_dir",
        str(run_dir),
        "--model.critic.target",
        target,
        "--model.critic.td_rounds",
        "1",
        "--data.pool_weights",
        "[1.0, 0.5]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["critic"]["target"] for r in records] == [target, target]
    # Iteration 1 trains on its own batch and iteration 0's (32 conversations each).
    assert [r["critic"]["buffers"] for r in records] == [1, 2]
    assert [r["critic"]["conversations"] for r in records] == [32, 64]
    # One Monte Carlo fit, then one refit on bootstrapped targets, which are not the MC returns.
    assert [r["critic"]["fits"] for r in records] == [2, 2]
    from iterppo_lightning.data.buffer import load_buffer

    returns = [g for c in load_buffer(run_dir / "iteration_0" / "buffer") for g in c.returns(0.9)]
    assert 0.0 <= records[0]["critic"]["mean_target"] <= 1.0
    assert records[0]["critic"]["mean_target"] != pytest.approx(sum(returns) / len(returns), abs=1e-3)


def test_critic_targets_import_neither_lightning_nor_the_datamodule():
    """rl/ is pure functions: its padding comes from data.padding (torch only), not the Lightning datamodule."""
    import subprocess
    import sys

    script = (
        "import sys, iterppo_lightning.rl.critic_targets\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'datasets', 'iterppo_lightning.data.datamodule')"
        " if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
