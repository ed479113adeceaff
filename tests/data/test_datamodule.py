"""TrajectoryDataModule: conversation-level split, critic targets, SFT labels, PPO prompt batches."""

from __future__ import annotations

import copy
import math
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
    expected = sorted((g, int(c.success)) for c in val_convs for g in c.returns(gamma))
    batches = list(dm.val_dataloader())  # every validation turn once (in batches bucketed by length)
    got = sorted(zip(torch.cat([b["target"] for b in batches]).tolist(), torch.cat([b["success"] for b in batches])))
    assert [g for g, _ in got] == pytest.approx([g for g, _ in expected])
    assert [int(s) for _, s in got] == [s for _, s in expected]

    # Training batches (shuffled) hold the same multiset of returns.
    train_convs = [c for c in conversations if c.conversation_id in _ids(dm.train_examples)]
    got = sorted(torch.cat([b["target"] for b in dm.train_dataloader()]).tolist())
    assert got == pytest.approx(sorted(g for c in train_convs for g in c.returns(gamma)))
    # The discount matters: some targets are strictly between 0 and 1 (success seen from earlier turns).
    all_targets = [e.target for e in dm.train_examples + dm.val_examples]
    assert any(0 < t < 1 for t in all_targets) and 1.0 in all_targets


def _epoch(loader, seed: int = 0) -> list[tuple[dict, list, list]]:
    """One epoch of `loader` drawn after torch.manual_seed(seed): per batch (batch, its rows (SequenceExample),
    its turns (TurnExample) in the batch's turn order), the rows as the collate function received them."""
    received, collate = [], loader.collate_fn

    def recording(rows):
        received.append(rows)
        return collate(rows)

    loader.collate_fn = recording
    torch.manual_seed(seed)
    batches = list(loader)
    loader.collate_fn = collate
    return [(b, rows, [t for row in rows for t in row.turns]) for b, rows in zip(batches, received, strict=True)]


def test_critic_batch_rows_are_right_padded_and_read_at_each_turns_suggestion(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, critic_batch_size=5)
    dm.use_phase("critic")
    seen = 0
    for batch, rows, turns in _epoch(dm.val_dataloader()):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for row, sequence in enumerate(rows):
            n = len(sequence.input_ids)
            assert ids[row, :n].tolist() == sequence.input_ids
            assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert batch["target"].tolist() == pytest.approx([t.target for t in turns])
        for k, ex in enumerate(turns):
            row, position = int(batch["read_rows"][k]), int(batch["read_positions"][k])
            # The turn's state and suggestion are the row's first tokens; the critic reads the suggestion's last, <end>.
            assert ids[row, : position + 1].tolist() == ex.prompt_ids + ex.action_ids
            assert ids[row, position] == ex.action_ids[-1] == tokenizer.eos_token_id
        seen += len(turns)
    assert seen == len(dm.val_examples)


# -- SFT examples ----------------------------------------------------------------------


def test_sft_labels_mask_the_prompt_and_keep_the_suggestion(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, sft_batch_size=6)
    dm.use_phase("sft")
    for batch, rows, _ in _epoch(dm.val_dataloader()):
        for row, sequence in enumerate(rows):
            labels = batch["labels"][row].tolist()
            expected = [-100] * len(labels)
            for ex in sequence.turns:
                p, a = len(ex.prompt_ids), len(ex.action_ids)
                assert sequence.input_ids[: p + a] == ex.prompt_ids + ex.action_ids
                expected[p : p + a] = ex.action_ids  # each reply is learnt, its state (earlier replies too) is context
                assert ex.action_ids[-1] == tokenizer.eos_token_id  # the model learns to stop
            assert labels == expected
    first = dm.val_examples[0]
    conv = next(c for c in conversations if c.conversation_id == first.conversation_id)
    assert tokenizer.decode(first.action_ids) == render_suggestion(conv.turns[conv.agent_turns[0]].suggestion)
    assert tokenizer.decode(first.prompt_ids) == render_state(conv, conv.agent_turns[0])


def test_filtered_bc_keeps_successful_conversations_only(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, sft_successful_only=True, sft_batch_size=1000, val_fraction=0.0)
    dm.use_phase("sft")
    (batch,) = list(dm.train_dataloader())
    n_success_turns = sum(len(c.agent_turns) for c in conversations if c.success)
    assert n_success_turns > 0
    assert batch["target"].shape[0] == n_success_turns  # one entry per cloned turn
    assert batch["success"].tolist() == [1] * n_success_turns
    n_reply_tokens = sum(len(e.action_ids) for e in dm.train_examples if e.success)
    assert int((batch["labels"] != -100).sum()) == n_reply_tokens


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


def _same(x, y) -> bool:
    """Batch values: tensors, or plain lists (the policy batches' state_keys)."""
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x) for x, y in zip(a, b))


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


# -- conversation sequences and bucketed batches (data/batching.py) ---------------------------------------------


def _key(e):
    return (e.conversation_id, e.turn_index)


def test_plain_conversations_are_one_sequence_holding_each_turns_row(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, conversation_rows=True)
    train_ids = _ids(dm.train_examples)
    assert [s.turns[0].conversation_id for s in dm.train_sequences] == [
        c.conversation_id for c in conversations if c.conversation_id in train_ids
    ]
    assert any(len(s.turns) > 1 for s in dm.train_sequences)
    for sequence in dm.train_sequences + dm.val_sequences:
        conv = next(c for c in conversations if c.conversation_id == sequence.turns[0].conversation_id)
        assert [t.turn_index for t in sequence.turns] == conv.agent_turns
        last = sequence.turns[-1]
        assert sequence.input_ids == last.prompt_ids + last.action_ids  # up to the end of its last reply
        for e, start, end in zip(sequence.turns, sequence.reply_starts, sequence.reply_ends):
            assert sequence.input_ids[:end] == e.prompt_ids + e.action_ids and start == len(e.prompt_ids)
    # The per-turn examples every other reader uses are the same objects, unchanged.
    assert [t for s in dm.train_sequences for t in s.turns] == dm.train_examples


def test_a_truncated_conversation_falls_back_to_per_turn_rows(tokenizer, conversations):
    full = _dm(tokenizer, conversations, val_fraction=0.0, conversation_rows=True)
    lengths = sorted(len(e.prompt_ids) for e in full.train_examples)
    limit = lengths[len(lengths) // 2]  # about half the states are cut
    dm = _dm(tokenizer, conversations, val_fraction=0.0, max_prompt_tokens=limit, conversation_rows=True)
    truncated = {e.conversation_id for e in full.train_examples if len(e.prompt_ids) > limit}
    assert truncated and truncated != _ids(full.train_examples)
    for sequence in dm.train_sequences:
        cid = sequence.turns[0].conversation_id
        if cid in truncated:  # every turn of it is its own per-turn row, with the truncated ids
            (e,) = sequence.turns
            assert sequence.input_ids == e.prompt_ids + e.action_ids and len(e.prompt_ids) <= limit
        else:
            assert len(sequence.turns) == len(next(c for c in conversations if c.conversation_id == cid).agent_turns)
    rows = Counter(s.turns[0].conversation_id for s in dm.train_sequences)
    assert all(rows[cid] == sum(e.conversation_id == cid for e in dm.train_examples) for cid in truncated)
    # Cut replies break the prefix too.
    cut_replies = _dm(tokenizer, conversations, val_fraction=0.0, max_action_tokens=2)
    assert all(len(s.turns) == 1 for s in cut_replies.train_sequences)


def test_a_chat_template_packs_only_the_conversations_it_renders_as_prefixes(conversations):
    from tiny_chat import train_chat_tokenizer

    from iterppo_lightning.loop.bootstrap import corpus

    dm = _dm(train_chat_tokenizer(corpus(conversations)), conversations, val_fraction=0.0, conversation_rows=True)
    rows = Counter(s.turns[0].conversation_id for s in dm.train_sequences)
    for conv in conversations:
        # The template writes the message sent where the plain format writes the suggestion: an edited or rejected
        # reply before the last one makes the next state differ from [state | suggestion].
        breaks = any(conv.turns[i].business_action in ("edit", "reject") for i in conv.agent_turns[:-1])
        assert rows[conv.conversation_id] == (len(conv.agent_turns) if breaks else 1)
    assert any(rows[c.conversation_id] > 1 for c in conversations) and any(
        rows[c.conversation_id] == 1 and len(c.agent_turns) > 1 for c in conversations
    )


@pytest.mark.parametrize("phase", ["critic", "sft"])
def test_every_turn_is_in_exactly_one_batch_per_epoch_with_its_values(tokenizer, conversations, phase):
    lengths = sorted(len(e.prompt_ids) for e in _dm(tokenizer, conversations).train_examples)
    dm = _dm(
        tokenizer,
        conversations,
        max_prompt_tokens=lengths[-len(lengths) // 4],
        critic_batch_size=6,
        conversation_rows=True,
    )
    assert any(len(s.turns) == 1 for s in dm.train_sequences) and any(len(s.turns) > 1 for s in dm.train_sequences)
    with dm.for_phase(phase, batch_size=6, bootstrap_members=2 if phase == "critic" else 1):
        for seed in (0, 1):
            epoch = _epoch(dm.train_dataloader(), seed)
            turns = [_key(t) for _, _, ts in epoch for t in ts]
            assert sorted(turns) == sorted(_key(e) for e in dm.train_examples)
            assert len(epoch) == math.ceil(len(dm.train_examples) / 6)
            for batch, rows, ts in epoch:
                assert batch["target"].tolist() == pytest.approx([t.target for t in ts])
                assert batch["success"].tolist() == [t.success for t in ts]
                assert batch["read_rows"].tolist() == [r for r, row in enumerate(rows) for _ in row.turns]
        val = _epoch(dm.val_dataloader(), 0)
        assert sorted(_key(t) for _, _, ts in val for t in ts) == sorted(_key(e) for e in dm.val_examples)


def test_set_targets_and_sft_turns_reach_the_batches(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, critic_batch_size=8, sft_batch_size=4)
    targets = {_key(e): (hash(_key(e)) % 1000) / 1000 for e in dm.all_examples}
    dm.set_targets(targets)
    with dm.for_phase("critic"):
        for batch, _, turns in _epoch(dm.train_dataloader(), 3):
            assert batch["target"].tolist() == pytest.approx([targets[_key(t)] for t in turns])
    # Behaviour cloning of one chosen turn per conversation: its reply alone is labelled, the row ends with it.
    chosen = {(c.conversation_id, c.agent_turns[len(c.agent_turns) // 2]) for c in conversations}
    with dm.for_phase("sft", sft_turns=chosen):
        epoch = _epoch(dm.train_dataloader(), 3)
    cloned = [_key(t) for _, _, ts in epoch for t in ts]
    assert sorted(cloned) == sorted(_key(e) for e in dm.train_examples if _key(e) in chosen)
    for batch, rows, _ in epoch:
        for r, row in enumerate(rows):
            (e,) = row.turns
            p, a = len(e.prompt_ids), len(e.action_ids)
            assert row.input_ids == e.prompt_ids + e.action_ids
            assert batch["labels"][r, : p + a].tolist() == [-100] * p + e.action_ids
            assert (batch["labels"][r, p + a :] == -100).all()


def test_pooled_weights_and_bootstrap_counts_are_per_turn(tmp_path, tokenizer, conversations):
    from iterppo_lightning.data.datamodule import bootstrap_count

    old = save_buffer(conversations[:20], tmp_path / "old")
    new = save_buffer(conversations[20:], tmp_path / "new")
    dm = TrajectoryDataModule(val_fraction=0.3, critic_batch_size=8, split_seed=4)
    dm.connect(tokenizer)
    dm.load_buffers([str(new), str(old)], [1.0, 0.25])
    old_ids = {c.conversation_id for c in conversations[:20]}
    raw = {_key(e): 0.25 if e.conversation_id in old_ids else 1.0 for e in dm.all_examples}
    mean = sum(raw.values()) / len(raw)
    with dm.for_phase("critic", bootstrap_members=3):
        for batch, _, turns in _epoch(dm.train_dataloader(), 0):
            assert batch["weight"].tolist() == pytest.approx([raw[_key(t)] / mean for t in turns])
            expected = [[bootstrap_count(t.conversation_id, m, 4) for t in turns] for m in range(3)]
            assert batch["bootstrap"].tolist() == expected


def test_bucketed_batches_pad_little_and_compute_fewer_tokens_than_per_turn_rows():
    from conftest import make_conversations

    from iterppo_lightning.loop.bootstrap import corpus
    from iterppo_lightning.models.tiny_lm import train_word_tokenizer

    conversations = make_conversations(400, seed0=50_000)
    dm = _dm(train_word_tokenizer(corpus(conversations)), conversations, val_fraction=0.1, conversation_rows=True)
    # The critic's auxiliary loss appends each turn's next customer message: its rows are bucketed by that length.
    for phase, batch_size, extra in (("critic", 32, {}), ("critic", 32, {"next_messages": True}), ("sft", 16, {})):
        with dm.for_phase(phase, batch_size=batch_size, **extra):
            for loader in (dm.train_dataloader(), dm.val_dataloader()):
                torch.manual_seed(0)
                masks = [b["attention_mask"] for b in loader]
                real, computed = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
                assert computed <= 1.2 * real
                turns = [e for s in loader.dataset for e in s.turns]
                per_turn_rows = sum(len(e.prompt_ids) + len(e.action_ids) for e in turns)
                assert computed < per_turn_rows  # fewer tokens than the per-turn rows, even before their padding


def test_batches_are_a_function_of_the_seed(tokenizer, conversations):
    for phase in ("critic", "sft"):
        dm = _dm(tokenizer, conversations, critic_batch_size=8, sft_batch_size=8)
        dm.use_phase(phase)
        assert _same_batches(_draw(dm, 5), _draw(dm, 5))
        assert not _same_batches(_draw(dm, 5), _draw(dm, 6))


def test_conversation_rows_off_gives_one_bucketed_row_per_turn(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, conversation_rows=False, critic_batch_size=8)
    assert len(dm.train_sequences) == len(dm.train_examples)
    for sequence, e in zip(dm.train_sequences, dm.train_examples):
        assert sequence.turns == [e] and sequence.input_ids == e.prompt_ids + e.action_ids
    dm.use_phase("critic")
    epoch = _epoch(dm.train_dataloader(), 0)
    assert sorted(_key(t) for _, _, ts in epoch for t in ts) == sorted(_key(e) for e in dm.train_examples)
    assert all(b["input_ids"].shape[0] == b["target"].shape[0] for b, _, _ in epoch)  # a row per turn


# -- next customer messages (the critic's auxiliary loss) --------------------------------------------------------------


def test_next_message_ids_are_what_the_next_state_adds_after_the_reply(tokenizer, conversations):
    dm = _dm(tokenizer, conversations, val_fraction=0.0, max_action_tokens=64)
    by_id = {c.conversation_id: c for c in conversations}
    closing = 0
    for e in dm.train_examples:
        conv = by_id[e.conversation_id]
        if e.turn_index + 1 >= len(conv.turns):
            assert e.next_ids == []  # nothing follows the reply in the log
            continue
        following = conv.turns[e.turn_index + 1]
        closing += following.terminal
        next_state = tokenizer(render_state(conv, e.turn_index + 1, tokenizer), add_special_tokens=False)["input_ids"]
        assert next_state[: len(e.prompt_ids) + len(e.action_ids)] == e.prompt_ids + e.action_ids  # plain: a prefix
        assert e.next_ids == next_state[len(e.prompt_ids) + len(e.action_ids) :]
        message = tokenizer(following.customer, add_special_tokens=False)["input_ids"]
        assert any(e.next_ids[i : i + len(message)] == message for i in range(len(e.next_ids)))
    assert closing > 0  # the closing customer messages count too
    short = _dm(tokenizer, conversations, val_fraction=0.0, max_action_tokens=3)
    assert all(len(e.next_ids) <= 3 for e in short.train_examples)
    assert all(e.next_ids == [] for e in short.train_examples if len(e.action_ids) == 3)  # cut replies: none


@pytest.mark.parametrize("conversation_rows", [False, True])
def test_critic_batches_carry_each_turns_next_message_after_its_reply(tokenizer, conversations, conversation_rows):
    dm = _dm(tokenizer, conversations, critic_batch_size=8, conversation_rows=conversation_rows)
    with dm.for_phase("critic"):
        plain = _epoch(dm.train_dataloader())
    with dm.for_phase("critic", next_messages=True):
        with_next = _epoch(dm.train_dataloader())
    with dm.for_phase("sft", next_messages=True):
        sft_keys = set(next(iter(dm.train_dataloader())))
    assert not any(k.startswith("aux_") for k in sft_keys)  # behaviour cloning never sees them
    assert not dm.next_messages  # for_phase put the setting back
    # Bucketed by the rows' collated lengths (next messages included), so batched differently from the plain ones,
    # over the same rows.
    with dm.for_phase("critic", next_messages=True):
        loader = dm.train_dataloader()
        collated = [int(loader.collate_fn([s])["attention_mask"].sum()) for s in loader.dataset]
        assert loader.batch_sampler.lengths == collated
        assert collated != [len(s.input_ids) for s in loader.dataset]
    assert sorted(id(r) for _, rows, _ in plain for r in rows) == sorted(
        id(r) for _, rows, _ in with_next for r in rows
    )
    assert all("aux_targets" not in a for a, _, _ in plain)
    covered = 0
    for b, rows_b, turns_b in with_next:
        ids = b["input_ids"]
        for row, sequence in enumerate(rows_b):  # every row starts with its own tokens
            assert ids[row, : len(sequence.input_ids)].tolist() == list(sequence.input_ids)
        assert torch.equal(b["read_rows"], torch.tensor([r for r, s in enumerate(rows_b) for _ in s.turns]))
        # Token k predicts aux_targets[k] from the position before it, and each turn's tokens are its next_ids.
        assert torch.equal(ids[b["aux_rows"], b["aux_positions"] + 1], b["aux_targets"])
        for t, turn in enumerate(turns_b):
            mine = b["aux_turns"] == t
            assert b["aux_targets"][mine].tolist() == turn.next_ids
            if turn.next_ids:
                assert int(b["aux_positions"][mine][0]) == int(b["read_positions"][t])  # right after the reply
                assert int(b["aux_rows"][mine][0]) == int(b["read_rows"][t])
            covered += bool(turn.next_ids)
    assert covered > 0


def test_imagined_conversations_join_the_critics_training_rows_only(tokenizer, conversations):
    own, imagined = conversations[:20], copy.deepcopy(conversations[20:30])
    for c in imagined:
        c.conversation_id = f"imagined-{c.conversation_id}"
    dm = _dm(tokenizer, own, critic_batch_size=8, imagined_weight=0.25)
    before = (list(dm.train_examples), list(dm.val_examples), list(dm.conversations))
    dm.add_critic_only(imagined, 0.25)
    assert (dm.train_examples, dm.val_examples, dm.conversations) == before  # targets, PPO, the probe: unchanged
    n_imagined = sum(len(c.agent_turns) for c in imagined)
    with dm.for_phase("critic"):
        batches = _epoch(dm.train_dataloader())
        val = _epoch(dm.val_dataloader())
    turns = [t for _, _, ts in batches for t in ts]
    assert len(turns) == len(dm.train_examples) + n_imagined
    assert all(not t.conversation_id.startswith("imagined") for _, _, ts in val for t in ts)
    # Each turn's weight over the data's mean weight: an imagined turn counts a quarter of an own one.
    weights = {}
    for batch, _, ts in batches:
        for t, w in zip(ts, batch["weight"].tolist()):
            weights[t.conversation_id.startswith("imagined")] = w
    assert weights[True] == pytest.approx(0.25 * weights[False])
    total = len(dm.all_examples) + n_imagined
    assert weights[False] == pytest.approx(total / (len(dm.all_examples) + 0.25 * n_imagined))
    with dm.for_phase("policy"):
        assert "weight" not in next(iter(dm.train_dataloader()))  # PPO's prompts as before
    dm.set_conversations(own)
    assert dm.critic_only_sequences == []  # a new iteration's data starts without them


def test_bad_imagined_weight_names_the_setting():
    with pytest.raises(ValueError, match="data.imagined_weight"):
        TrajectoryDataModule(imagined_weight=-0.5)


# -- branch pairs: two replies at one state ------------------------------------------------------------------------


def _with_branches(conversations, count: int = 8):
    """`conversations` plus `count` branch conversations: each a copy of one of them from its turn t on with
    another reply there (and the original's ending), recorded as env/branching.py records a branch."""
    out = copy.deepcopy(conversations)
    for n, original in enumerate(conversations[:count]):
        t = original.agent_turns[n % len(original.agent_turns)]
        branch = copy.deepcopy(original)
        branch.conversation_id = f"{original.conversation_id}-b{t}"
        branch.turns[t].suggestion = branch.turns[t].sent = "anything else for you"
        branch.metadata["branch"] = {"of": original.conversation_id, "turn": t, "stream": n}
        out.append(branch)
    return out


@pytest.mark.parametrize("conversation_rows", [False, True])
def test_branch_pairs_share_a_batch_and_name_their_two_turns(tokenizer, conversations, conversation_rows):
    data = _with_branches(conversations)
    dm = _dm(tokenizer, data, val_fraction=0.0, critic_batch_size=6, conversation_rows=conversation_rows)
    pairs = dm.branch_pairs()
    assert len(pairs) == 8
    for first, second in pairs:
        assert second.conversation_id == f"{first.conversation_id}-b{first.turn_index}"
        assert first.prompt_ids == second.prompt_ids and first.action_ids != second.action_ids  # one state, two replies
    expected = sorted((_key(a), _key(b)) for a, b in pairs)
    with dm.for_phase("critic", branch_pairs=True):
        for seed in (0, 1):
            epoch = _epoch(dm.train_dataloader(), seed)
            turns, found = [], []
            for batch, _, ts in epoch:
                assert batch["target"].tolist() == pytest.approx([t.target for t in ts])
                found += [(_key(ts[a]), _key(ts[b])) for a, b in zip(batch["pair_first"], batch["pair_second"])]
                turns += [_key(t) for t in ts]
            assert sorted(turns) == sorted(_key(e) for e in dm.train_examples)  # every turn once per epoch
            assert sorted(found) == expected  # every pair once, both turns in its batch
    # Outside the block, and without the flag, batches are the plain ones.
    torch.manual_seed(0)
    assert all("pair_first" not in b for b in dm.train_dataloader())


def test_a_branch_pair_split_by_the_validation_split_is_not_a_pair(tokenizer, conversations):
    data = _with_branches(conversations, count=len(conversations))
    dm = _dm(tokenizer, data, val_fraction=0.5)
    train = {e.conversation_id for e in dm.train_examples}
    expected = [c for c in data if "branch" in c.metadata and {c.conversation_id, c.metadata["branch"]["of"]} <= train]
    assert 0 < len(dm.branch_pairs()) == len(expected) < len(conversations)
