"""TrajectoryDataModule: conversation-level split, critic targets, SFT labels, PPO prompt batches."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from iterppo_lightning.data.buffer import save_buffer
from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.data.rendering import render_state, render_suggestion


def _dm(tokenizer, conversations, **kwargs) -> TrajectoryDataModule:
    kwargs.setdefault("val_fraction", 0.3)
    dm = TrajectoryDataModule(**kwargs)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    return dm


def _ids(examples):
    return {e.conversation_id for e in examples}


# -- validation split -------------------------------------------------------------


def test_validation_split_is_by_whole_conversation(tokenizer, conversations):
    dm = _dm(tokenizer, conversations)
    train_ids, val_ids = _ids(dm.train_examples), _ids(dm.val_examples)
    assert train_ids and val_ids, "both sides of a 30% split of 40 conversations must be non-empty"
    assert not train_ids & val_ids
    # Every agent turn of every conversation is an example, all on its conversation's side.
    per_side = {cid: ("train" if cid in train_ids else "val") for cid in train_ids | val_ids}
    counts = Counter(e.conversation_id for e in dm.train_examples + dm.val_examples)
    for conv in conversations:
        assert counts[conv.conversation_id] == len(conv.agent_turns)
        side = dm.train_examples if per_side[conv.conversation_id] == "train" else dm.val_examples
        assert sum(e.conversation_id == conv.conversation_id for e in side) == len(conv.agent_turns)


def test_split_is_stable_under_reordering_and_subsetting(tokenizer, conversations):
    val_ids = _ids(_dm(tokenizer, conversations).val_examples)
    assert _ids(_dm(tokenizer, conversations[::-1]).val_examples) == val_ids
    # Loading only some of the conversations (e.g. another buffer pool) keeps each on its side.
    half = conversations[::2]
    assert _ids(_dm(tokenizer, half).val_examples) == val_ids & {c.conversation_id for c in half}
    # A different split seed gives a different split.
    assert _ids(_dm(tokenizer, conversations, split_seed=1).val_examples) != val_ids


def test_split_fraction_is_roughly_respected(tokenizer, conversations):
    many = []
    for i in range(5):
        batch = copy.deepcopy(conversations)
        for c in batch:
            c.conversation_id = f"{c.conversation_id}-{i}"
        many.extend(batch)
    dm = _dm(tokenizer, many, val_fraction=0.2)
    share = len(_ids(dm.val_examples)) / len(many)
    assert 0.1 < share < 0.3
    assert _dm(tokenizer, conversations, val_fraction=0.0).val_examples == []


# -- critic examples ----------------------------------------------------------------


def test_critic_targets_are_monte_carlo_returns_with_data_gamma(tokenizer, conversations):
    gamma = 0.5
    dm = _dm(tokenizer, conversations, gamma=gamma, critic_batch_size=7)
    dm.use_phase("critic")
    val_convs = [c for c in conversations if c.conversation_id in _ids(dm.val_examples)]
    expected = [g for c in val_convs for g in c.returns(gamma)]
    expected_success = [int(c.success) for c in val_convs for _ in c.agent_turns]
    batches = list(dm.val_dataloader())  # validation keeps order
    assert torch.cat([b["target"] for b in batches]).tolist() == pytest.approx(expected)
    assert torch.cat([b["success"] for b in batches]).tolist() == expected_success

    # Training batches (shuffled) hold the same multiset of returns.
    train_convs = [c for c in conversations if c.conversation_id in _ids(dm.train_examples)]
    got = sorted(torch.cat([b["target"] for b in dm.train_dataloader()]).tolist())
    assert got == pytest.approx(sorted(g for c in train_convs for g in c.returns(gamma)))
    # The discount matters: some targets are strictly between 0 and 1 (success seen from earlier turns).
    all_targets = [e.target for e in dm.train_examples + dm.val_examples]
    assert any(0 < t < 1 for t in all_targets) and 1.0 in all_targets


def test_critic_batch_is_state_then_suggestion_right_padded(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, critic_batch_size=5)
    dm.use_phase("critic")
    batch = next(iter(dm.val_dataloader()))
    for row, ex in enumerate(dm.val_examples[:5]):
        n = len(ex.prompt_ids) + len(ex.action_ids)
        assert batch["input_ids"][row, :n].tolist() == ex.prompt_ids + ex.action_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        # The critic reads the suggestion's last token, <end>.
        assert ex.action_ids[-1] == tokenizer.eos_token_id


# -- SFT examples ----------------------------------------------------------------------


def test_sft_labels_mask_the_prompt_and_keep_the_suggestion(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, sft_batch_size=6)
    dm.use_phase("sft")
    batch = next(iter(dm.val_dataloader()))
    examples = dm.val_examples[:6]
    width = batch["labels"].shape[1]
    for row, ex in enumerate(examples):
        p, a = len(ex.prompt_ids), len(ex.action_ids)
        labels = batch["labels"][row].tolist()
        assert labels[:p] == [-100] * p
        assert labels[p : p + a] == ex.action_ids
        assert labels[p + a :] == [-100] * (width - p - a)
        assert labels[p + a - 1] == tokenizer.eos_token_id  # the model learns to stop
    first = examples[0]
    conv = next(c for c in conversations if c.conversation_id == first.conversation_id)
    assert tokenizer.decode(first.action_ids) == render_suggestion(conv.turns[conv.agent_turns[0]].suggestion)
    assert tokenizer.decode(first.prompt_ids) == render_state(conv, conv.agent_turns[0])


def test_filtered_bc_keeps_successful_conversations_only(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, sft_successful_only=True, sft_batch_size=1000, val_fraction=0.0)
    dm.use_phase("sft")
    (batch,) = list(dm.train_dataloader())
    n_success_turns = sum(len(c.agent_turns) for c in conversations if c.success)
    assert n_success_turns > 0
    assert batch["input_ids"].shape[0] == n_success_turns
    assert batch["success"].tolist() == [1] * n_success_turns


# -- policy prompts -------------------------------------------------------------------------


def test_policy_loader_yields_policy_batches_left_padded_batches(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, policy_batch_size=5, policy_batches=3)
    dm.use_phase("policy")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert dm.val_dataloader() == []  # PPO has no validation loop
    prompts = {tuple(e.prompt_ids) for e in dm.train_examples + dm.val_examples}
    agent_id = tokenizer.convert_tokens_to_ids("<agent>")
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape[0] == 5 and mask.shape == ids.shape
        assert (mask[:, -1] == 1).all(), "left padding: the last column is real for every row"
        for row in range(5):
            m = mask[row]
            n = int(m.sum())
            assert m.tolist() == [0] * (len(m) - n) + [1] * n
            assert (ids[row, : len(m) - n] == tokenizer.pad_token_id).all()
            assert tuple(ids[row, len(m) - n :].tolist()) in prompts
            assert ids[row, -1] == agent_id  # every prompt ends where the agent speaks


def test_long_prompts_keep_their_last_tokens(tokenizer, conversations):
    full = _dm(tokenizer, conversations, max_prompt_tokens=10_000, val_fraction=0.0)
    cut = _dm(tokenizer, conversations, max_prompt_tokens=12, max_action_tokens=3, val_fraction=0.0)
    assert any(len(e.prompt_ids) > 12 for e in full.train_examples)
    for long, short in zip(full.train_examples, cut.train_examples):
        assert short.prompt_ids == long.prompt_ids[-12:]
        assert short.action_ids == long.action_ids[:3]


def test_load_buffers_pools_several_buffers(tmp_path, tokenizer, conversations):
    a = save_buffer(conversations[:20], tmp_path / "a")
    b = save_buffer(conversations[20:], tmp_path / "b")
    dm = TrajectoryDataModule(val_fraction=0.3)
    dm.connect(tokenizer)
    dm.load_buffers([str(a), str(b)])
    ref = _dm(tokenizer, conversations)
    assert [(e.conversation_id, e.prompt_ids, e.target) for e in dm.train_examples] == [
        (e.conversation_id, e.prompt_ids, e.target) for e in ref.train_examples
    ]


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan")])
def test_bad_gamma_names_data_gamma(gamma):
    with pytest.raises(ValueError, match=r"data\.gamma"):
        TrajectoryDataModule(gamma=gamma)


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0])
def test_bad_val_fraction_names_the_setting(val_fraction):
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        TrajectoryDataModule(val_fraction=val_fraction)


def test_misuse_is_reported(tokenizer, conversations):
    dm = TrajectoryDataModule()
    with pytest.raises(RuntimeError, match="connect"):
        dm.set_conversations(conversations)
    with pytest.raises(ValueError, match="phase"):
        dm.use_phase("rl")
    dm.connect(tokenizer)
    unfinished = copy.deepcopy(conversations[0])
    unfinished.turns = unfinished.turns[:1]
    unfinished.turns[0].sent = None  # no agent turn at all
    with pytest.raises(ValueError, match="no agent turns"):
        dm.set_conversations([unfinished])


# -- phases with their settings (for_phase) -----------------------------------------------------


def _draw(dm, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    return list(dm.train_dataloader()) + list(dm.val_dataloader() or [])


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize(
    "phase, settings, attributes",
    [
        ("sft", {"batch_size": 5}, {"sft_batch_size": 5}),
        ("sft", {"batch_size": 3, "sft_turns": "first"}, {"sft_batch_size": 3, "sft_turns": "first"}),
        ("critic", {"bootstrap_members": 3}, {"bootstrap_members": 3}),
        ("policy", {}, {}),
    ],
)
def test_for_phase_draws_exactly_what_the_switched_datamodule_draws(
    tokenizer, conversations, phase, settings, attributes
):
    first = {(c.conversation_id, c.agent_turns[0]) for c in conversations if c.agent_turns}
    settings = {k: first if v == "first" else v for k, v in settings.items()}
    attributes = {k: first if v == "first" else v for k, v in attributes.items()}
    switched = _dm(tokenizer, conversations)
    switched.use_phase(phase)
    for name, value in attributes.items():
        setattr(switched, name, value)
    scoped = _dm(tokenizer, conversations)
    with scoped.for_phase(phase, **settings):
        drawn = _draw(scoped, 11)
    assert _same_batches(drawn, _draw(switched, 11))


def test_for_phase_puts_the_settings_back_even_when_the_fit_fails(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, sft_batch_size=64)
    before = (dm.phase, dm.sft_batch_size, dm.sft_turns, dm.bootstrap_members)
    with pytest.raises(RuntimeError, match="fit failed"):
        with dm.for_phase("sft", batch_size=4, sft_turns={("x", 0)}):
            assert (dm.phase, dm.sft_batch_size, dm.sft_turns) == ("sft", 4, {("x", 0)})
            raise RuntimeError("fit failed")
    assert (dm.phase, dm.sft_batch_size, dm.sft_turns, dm.bootstrap_members) == before
    with dm.for_phase("critic", bootstrap_members=2):
        assert dm.bootstrap_members == 2 and dm.phase == "critic"
    assert (dm.phase, dm.sft_batch_size, dm.sft_turns, dm.bootstrap_members) == before
    with pytest.raises(ValueError, match="unknown phase"):
        with dm.for_phase("rl"):
            pass
