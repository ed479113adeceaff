"""CriticModule: learns Q from Monte Carlo returns, scores in [0, 1], thaws itself after the policy phase."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_trainer, toy_conversation

from iterppo_lightning.data.datamodule import TrajectoryDataModule, in_validation
from iterppo_lightning.data.padding import pad_left
from iterppo_lightning.modules.critic import CriticModule, SoftCalibrationError
from iterppo_lightning.modules.policy import PolicyModule

OPENINGS = ["hello", "greetings", "howdy", "hi"]


@pytest.fixture()
def base_dir(tmp_path, tiny_model, tokenizer):
    """A saved causal LM folder, what pi_0 is to the critic."""
    out = tmp_path / "pi_0"
    tiny_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _toy_datamodule(tokenizer, n=64):
    # The return depends only on the suggestion ("good" -> 1, "bad" -> 0); every opening meets both.
    convs = [
        toy_conversation(
            f"toy-{i}", OPENINGS[(i // 2) % len(OPENINGS)], "good" if i % 2 == 0 else "bad", success=i % 2 == 0
        )
        for i in range(n)
    ]
    dm = TrajectoryDataModule(gamma=0.9, val_fraction=0.3, critic_batch_size=16)
    dm.connect(tokenizer)
    dm.set_conversations(convs)
    dm.use_phase("critic")
    assert {e.success for e in dm.val_examples} == {0, 1}, "the toy validation split needs both classes"
    return dm


def _encode_pairs(tokenizer, pairs):
    texts = [f"<customer> {opening} <agent> {reply} <end>" for opening, reply in pairs]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return pad_left(ids, tokenizer.pad_token_id)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "settings",
    [
        {"readout": "last"},
        {"readout": "reply_mean"},
        {"readout": "reply_logprob"},
        {"readout": "reply_surprise"},
        {"readout": "reply_mean", "head_hidden": 16},
        {"readout": "reply_surprise", "surprise_threshold": 0.05},
    ],
    ids=lambda settings: "-".join(str(v) for v in settings.values()),
)
def test_critic_learns_which_suggestion_succeeds(base_dir, tokenizer, settings):
    torch.manual_seed(0)
    dm = _toy_datamodule(tokenizer)
    critic = CriticModule(lr=5e-3, **settings)
    critic.build(base_dir)
    assert isinstance(critic.head, torch.nn.Sequential) == ("head_hidden" in settings)
    pairs = [(o, "good") for o in OPENINGS] + [(o, "bad") for o in OPENINGS]
    ids, mask = _encode_pairs(tokenizer, pairs)
    # Left-padded [state | reply]: the reply is the last two tokens ("good"/"bad", "<end>") of every row.
    reply_starts = torch.full((len(pairs),), ids.shape[1] - 2)
    assert torch.equal(critic.score(ids, mask, reply_starts), torch.full((8,), 0.5))  # a new critic knows nothing
    trainer = make_trainer(max_epochs=5)
    trainer.fit(critic, datamodule=dm)
    metrics = trainer.callback_metrics
    assert metrics["critic/val_auroc"] > 0.9
    assert metrics["critic/val_loss"] < 0.45  # ln 2 = 0.69 is the uninformed loss
    assert {"critic/val_brier", "critic/val_calibration_error"} <= set(metrics)

    q = critic.score(ids, mask, reply_starts)
    assert q.shape == (8,)
    assert ((q >= 0) & (q <= 1)).all()
    assert q[:4].min() > q[4:].max()
    assert q[:4].min() > 0.65 and q[4:].max() < 0.35


def test_a_critic_unlike_the_policy_is_built_from_its_overrides_and_learns(base_dir, tokenizer):
    torch.manual_seed(0)
    overrides = {"n_layer": 3, "n_embd": 64, "n_head": 2}
    critic = CriticModule(lr=5e-3, init_from_policy=False, backbone_overrides=overrides)
    critic.build(base_dir)
    assert {k: getattr(critic.backbone.config, k) for k in overrides} == overrides
    assert len(critic.backbone.h) == 3 and critic.head.in_features == 64
    trainer = make_trainer(max_epochs=5)
    trainer.fit(critic, datamodule=_toy_datamodule(tokenizer))
    assert trainer.callback_metrics["critic/val_auroc"] > 0.9


def test_backbone_overrides_are_refused_where_they_cannot_apply(base_dir):
    with pytest.raises(ValueError, match="model.critic.backbone_overrides .*model.critic.init_from_policy false"):
        CriticModule(backbone_overrides={"n_layer": 4})
    critic = CriticModule(init_from_policy=False, backbone_overrides={"n_layers": 4})
    with pytest.raises(ValueError, match="'n_layers' is not a field of the policy's model config"):
        critic.build(base_dir)


def test_val_auroc_is_not_reported_as_zero_when_it_is_undefined(base_dir, tokenizer):
    # Successes only among training conversations: the validation split holds failures only.
    convs = []
    for i in range(48):
        cid = f"toy-{i}"
        good = i % 2 == 0 and not in_validation(cid, 0.3, 0)
        convs.append(toy_conversation(cid, OPENINGS[(i // 2) % len(OPENINGS)], "good" if good else "bad", success=good))
    dm = TrajectoryDataModule(val_fraction=0.3, critic_batch_size=16)
    dm.connect(tokenizer)
    dm.set_conversations(convs)
    assert dm.val_examples and {e.success for e in dm.val_examples} == {0}
    critic = CriticModule(lr=5e-3)
    critic.build(base_dir)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(critic, datamodule=dm)
    auroc = trainer.callback_metrics.get("critic/val_auroc")
    assert auroc is None or torch.isnan(auroc), f"undefined AUROC reported as {float(auroc)}"


def test_score_is_a_probability_even_for_extreme_heads(base_dir, tokenizer):
    critic = CriticModule()
    critic.build(base_dir)
    ids, mask = _encode_pairs(tokenizer, [("hi", "good"), ("hello there", "bad bad bad")])
    # A fresh critic's head is zero: Q = 0.5 everywhere, an uninformative start.
    assert critic.score(ids, mask).tolist() == pytest.approx([0.5, 0.5])
    for bias in (80.0, -80.0):
        with torch.no_grad():
            critic.head.bias.fill_(bias)
            critic.head.weight.normal_(0, 10)
        q = critic.score(ids, mask)
        assert ((q >= 0) & (q <= 1)).all()
        assert not q.requires_grad


def test_score_ignores_padding_on_either_side(base_dir, tokenizer):
    critic = CriticModule()
    critic.build(base_dir)
    with torch.no_grad():
        critic.head.weight.normal_(0, 1)
    seq = tokenizer("<customer> hi <agent> good <end>", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    alone = critic(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
    # [left pads | sequence | right pads], the layout of a PPO rollout (prompt | reply).
    padded = torch.tensor([[pad, pad] + seq + [pad, pad, pad]])
    mask = torch.tensor([[0, 0] + [1] * len(seq) + [0, 0, 0]])
    assert critic(padded, mask).item() == pytest.approx(alone.item(), abs=1e-5)


@pytest.mark.parametrize("readout", ["reply_mean", "reply_logprob", "reply_surprise"])
def test_reply_readouts_read_the_same_q_in_ppo_scoring_as_in_training(base_dir, tokenizer, readout):
    """PPO scores [left-padded state | reply] rows given where the replies start; training reads the same turn from
    a right-padded batch row with `read_starts`. Both must read the reply's own tokens, padding left out."""
    torch.manual_seed(0)
    critic = CriticModule(readout=readout)
    critic.build(base_dir)
    with torch.no_grad():  # scaled so that Q stays off sigmoid's flat ends with any number of features
        critic.head.weight.normal_(0, critic.head.in_features**-0.5)
    state = tokenizer("<customer> hi there <agent>", add_special_tokens=False)["input_ids"]
    replies = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in ("good <end>", "bad bad bad <end>")]
    pad = tokenizer.pad_token_id
    width = max(len(r) for r in replies)
    # The rollout layout: the prompt (left-padded to width P) then the reply (right-padded).
    ids = torch.tensor([[pad] + state + r + [pad] * (width - len(r)) for r in replies])
    mask = torch.tensor([[0] + [1] * (len(state) + len(r)) + [0] * (width - len(r)) for r in replies])
    scored = critic.score(ids, mask, torch.tensor([1 + len(state)] * 2))
    batch = {
        "input_ids": torch.tensor([state + r + [pad] * (width - len(r)) for r in replies]),
        "attention_mask": torch.tensor([[1] * (len(state) + len(r)) + [0] * (width - len(r)) for r in replies]),
        "read_rows": torch.tensor([0, 1]),
        "read_positions": torch.tensor([len(state) + len(r) - 1 for r in replies]),
        "read_starts": torch.tensor([len(state)] * 2),
    }
    with torch.no_grad():
        trained = torch.sigmoid(critic.batch_logits(batch))
    assert torch.allclose(scored, trained, atol=1e-5)
    assert (scored[0] - scored[1]).abs() > 1e-3  # the two replies read differently
    with pytest.raises(ValueError, match=readout):
        critic.score(ids, mask)


def test_new_fit_thaws_a_critic_frozen_by_the_policy_phase(base_dir, tokenizer):
    dm = _toy_datamodule(tokenizer, n=32)
    critic = CriticModule(lr=1e-2)
    critic.build(base_dir)
    PolicyModule().attach_critic(critic)  # the policy phase freezes Q_k
    assert not any(p.requires_grad for p in critic.parameters())
    before = _weights(critic)
    make_trainer(max_epochs=1, limit_val_batches=0).fit(critic, datamodule=dm)
    assert all(p.requires_grad for p in critic.parameters())
    after = _weights(critic)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "head.weight" in changed
    assert any(k.startswith("backbone.") for k in changed), "the backbone must train too, not only the head"


def test_build_from_config_only_gives_a_different_backbone(base_dir):
    warm = CriticModule(init_from_policy=True)
    warm.build(base_dir)
    cold = CriticModule(init_from_policy=False)
    cold.build(base_dir)
    assert warm.backbone.config.hidden_size == cold.backbone.config.hidden_size == 32
    assert not torch.equal(warm.backbone.wte.weight, cold.backbone.wte.weight)


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="loss"):
        CriticModule(loss="hinge")


def test_soft_calibration_error_hand_example():
    metric = SoftCalibrationError(n_bins=10)
    # Bin 0: mean pred 0.05 vs mean target 0.0; bin 9: mean pred 0.95 vs mean target 0.8.
    metric.update(torch.tensor([0.05, 0.95, 0.95]), torch.tensor([0.0, 0.8, 0.8]))
    assert metric.compute().item() == pytest.approx((0.05 + 2 * 0.15) / 3)
    perfect = SoftCalibrationError(n_bins=4)
    perfect.update(torch.tensor([0.1, 0.6]), torch.tensor([0.1, 0.6]))
    assert perfect.compute().item() == pytest.approx(0.0, abs=1e-7)


# -- a pessimistic ensemble -------------------------------------------------------------------------------------


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _members(critic):
    return [(critic.backbone, critic.head)] + [(m["backbone"], m["head"]) for m in critic.extra_members]


def test_ensemble_score_is_mean_minus_c_std_and_q_mean_the_mean(base_dir, tokenizer):
    critic = CriticModule(ensemble_size=3, pessimism=2.0)
    critic.build(base_dir)
    # Constant members (zero weights): Q = 0.2, 0.4, 0.9 on every pair.
    with torch.no_grad():
        for (_, head), q in zip(_members(critic), (0.2, 0.4, 0.9)):
            head.weight.zero_()
            head.bias.fill_(_logit(q))
    ids, mask = _encode_pairs(tokenizer, [("hi", "good"), ("hello", "bad bad")])
    assert critic(ids, mask).shape == (3, 2)
    # mean 0.5; sample std sqrt(((-0.3)^2 + (-0.1)^2 + 0.4^2) / 2) = sqrt(0.13) = 0.3605551
    assert critic.q_mean(ids, mask).tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert critic.score(ids, mask).tolist() == pytest.approx([0.5 - 2 * math.sqrt(0.13)] * 2, abs=1e-6)


def test_ensemble_members_start_differently_and_a_single_critic_at_zero(base_dir):
    torch.manual_seed(0)
    critic = CriticModule(ensemble_size=3)
    critic.build(base_dir)
    heads = [head.weight.detach().clone() for _, head in _members(critic)]
    assert all(h.abs().sum() > 0 for h in heads)
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    single = CriticModule()
    single.build(base_dir)
    assert single.head.weight.abs().sum() == 0 and len(single.extra_members) == 0
    assert not any(k.startswith("extra_members") for k in single.state_dict())  # critic.pt of one critic is unchanged


def test_ensemble_loss_weights_each_member_by_its_own_bootstrap_counts():
    critic = CriticModule(ensemble_size=2)
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.5]])
    target = torch.tensor([1.0, 0.0, 0.5])
    counts = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    pool = torch.tensor([1.0, 0.5, 1.0])
    bce = lambda x: torch.nn.functional.binary_cross_entropy_with_logits(x, target, reduction="none")  # noqa: E731
    # member m: mean over the batch of count_m * pool * BCE; the loss is their sum.
    expected = float((counts[0] * pool * bce(logits[0])).mean() + (counts[1] * pool * bce(logits[1])).mean())
    loss = critic._ensemble_loss(logits, {"target": target, "bootstrap": counts, "weight": pool})
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_a_member_gets_no_gradient_from_examples_outside_its_bootstrap(base_dir, tokenizer):
    critic = CriticModule(ensemble_size=2)
    critic.build(base_dir)
    ids, mask = _encode_pairs(tokenizer, [("hi", "good"), ("hello", "bad")])
    batch = {"target": torch.tensor([1.0, 0.0]), "bootstrap": torch.tensor([[1.0, 2.0], [0.0, 0.0]])}
    critic._ensemble_loss(critic(ids, mask), batch).backward()
    (_, first), (second_backbone, second) = _members(critic)
    assert first.weight.grad.abs().sum() > 0
    assert second.weight.grad.abs().sum() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in second_backbone.parameters())


def test_ensemble_learns_and_round_trips_through_its_state_dict(base_dir, tokenizer):
    torch.manual_seed(0)
    dm = _toy_datamodule(tokenizer)
    dm.bootstrap_members = 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["bootstrap"].shape == (3, batch["target"].shape[0])
    critic = CriticModule(lr=5e-3, ensemble_size=3, pessimism=1.0)
    critic.build(base_dir)
    trainer = make_trainer(max_epochs=5)
    trainer.fit(critic, datamodule=dm)
    assert trainer.callback_metrics["critic/val_auroc"] > 0.9  # of the members' mean
    ids, mask = _encode_pairs(tokenizer, [(o, "good") for o in OPENINGS] + [(o, "bad") for o in OPENINGS])
    q = critic.score(ids, mask)
    assert q[:4].min() > q[4:].max()
    assert (q <= critic.q_mean(ids, mask)).all()  # pessimism only lowers the reward
    again = CriticModule(ensemble_size=3, pessimism=1.0)
    again.build(base_dir)
    again.load_state_dict(critic.state_dict())
    assert torch.equal(again.score(ids, mask), q)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"ensemble_size": 0}, "model.critic.ensemble_size"),
        ({"pessimism": -0.5, "ensemble_size": 2}, "model.critic.pessimism"),
        ({"pessimism": 1.0}, "model.critic.ensemble_size"),
        ({"target": "oracle"}, "critic.target"),
    ],
)
def test_bad_ensemble_settings_name_the_key(kwargs, named):
    with pytest.raises(ValueError, match=named):
        CriticModule(**kwargs)


# -- one causal pass per conversation ---------------------------------------------------------------------------


def _conversation_datamodule(tokenizer, conversations) -> TrajectoryDataModule:
    dm = TrajectoryDataModule(val_fraction=0.0, conversation_rows=True)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    assert len(dm.train_sequences) == len(conversations) < len(dm.train_examples), "plain conversations pack"
    return dm


@pytest.mark.parametrize("readout", ["last", "reply_mean", "reply_logprob", "reply_surprise"])
@pytest.mark.parametrize("ensemble_size", [1, 3])
def test_one_pass_per_conversation_reads_each_turns_q_of_its_own_row(
    base_dir, tokenizer, conversations, ensemble_size, readout
):
    torch.manual_seed(0)
    critic = CriticModule(ensemble_size=ensemble_size, readout=readout)
    critic.build(base_dir)
    with torch.no_grad():
        for _, head in _members(critic):
            head.weight.normal_(0, 1)  # Q depends on the hidden state read
    critic.eval()
    dm = _conversation_datamodule(tokenizer, conversations)
    # Sequences list the same turns, in the same order, as the per-turn examples.
    per_turn, one_pass = dm._collate_pairs(dm.train_examples), dm._collate_sequences(dm.train_sequences)
    assert one_pass["attention_mask"].sum() < per_turn["attention_mask"].sum()  # the point: fewer tokens
    with torch.no_grad():
        expected, got = critic.batch_logits(per_turn), critic.batch_logits(one_pass)
    n = len(dm.train_examples)
    assert got.shape == expected.shape == ((n,) if ensemble_size == 1 else (ensemble_size, n))
    assert (got - expected).abs().max() <= 1e-5
    assert expected.std() > 1e-3  # the turns' Q differ: a read at the wrong position would show
    assert torch.equal(one_pass["target"], per_turn["target"])
    assert critic._loss(got[0] if ensemble_size > 1 else got, one_pass["target"]).item() == pytest.approx(
        critic._loss(expected[0] if ensemble_size > 1 else expected, per_turn["target"]).item(), abs=1e-6
    )


def test_critic_loss_share_counts_turns_not_rows(base_dir, tokenizer, conversations, monkeypatch):
    import iterppo_lightning.modules.critic as critic_module

    counts = []
    monkeypatch.setattr(critic_module, "global_share", lambda n: counts.append(int(n)))  # one process: None
    critic = CriticModule()
    critic.build(base_dir)
    dm = _conversation_datamodule(tokenizer, conversations[:6])
    batch = dm._collate_sequences(dm.train_sequences)
    critic.training_step(batch, 0)
    assert counts == [len(dm.train_examples)] and len(dm.train_examples) > batch["input_ids"].shape[0]


# -- the auxiliary next-message loss -------------------------------------------------------------------------------


def _next_message_batches(tokenizer, conversations, conversation_rows: bool, next_messages: bool) -> list[dict]:
    dm = TrajectoryDataModule(val_fraction=0.3, critic_batch_size=16, conversation_rows=conversation_rows)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    with dm.for_phase("critic", next_messages=next_messages):
        # The same rows in the same batches either way (the loaders bucket by the collated length, which the
        # appended messages change): the validation rows in their stored order, 16 at a time.
        loader = dm.val_dataloader()
        rows = list(loader.dataset)
        return [loader.collate_fn(rows[i : i + 16]) for i in range(0, len(rows), 16)]


@pytest.mark.parametrize("conversation_rows", [False, True])
@pytest.mark.parametrize("ensemble_size", [1, 2])
@pytest.mark.parametrize("loss", ["aux_next_message_coef", "aux_reaction_coef"])
def test_appended_next_messages_leave_q_unchanged(
    base_dir, tokenizer, conversations, conversation_rows, ensemble_size, loss
):
    torch.manual_seed(0)
    critic = CriticModule(ensemble_size=ensemble_size, readout="reply_mean", **{loss: 1.0})
    critic.build(base_dir)
    with torch.no_grad():
        for _, head in _members(critic):
            head.weight.normal_(0, 1)
    critic.eval()
    plain = _next_message_batches(tokenizer, conversations, conversation_rows, next_messages=False)
    with_next = _next_message_batches(tokenizer, conversations, conversation_rows, next_messages=True)
    appended = 0
    for a, b in zip(plain, with_next, strict=True):
        assert "aux_targets" not in a and b["aux_targets"].numel() > 0
        appended += b["attention_mask"].sum() - a["attention_mask"].sum()
        with torch.no_grad():
            q_a = critic(
                a["input_ids"], a["attention_mask"], a["read_rows"], a["read_positions"], read_starts=a["read_starts"]
            )
            q_b, *token_losses = critic._batch_outputs(b)
        assert torch.allclose(q_a, q_b, atol=1e-6), (q_a - q_b).abs().max()
        (used,) = [losses for losses in token_losses if losses is not None]  # only the loss that is on
        assert used.shape[-1] == b["aux_targets"].numel()
    assert appended > 0  # the rows did get longer


def test_aux_head_is_pi0s_lm_head_and_its_loss_pi0s_next_message_loss(base_dir, tokenizer, tiny_model, conversations):
    critic = CriticModule(aux_next_message_coef=1.0)
    critic.build(base_dir)
    assert critic.lm_head is None  # tied embeddings: the backbone's own serve as LM head
    (batch, *_) = _next_message_batches(tokenizer, conversations, False, next_messages=True)
    with torch.no_grad():
        _, token_losses, reaction_losses = critic._batch_outputs(batch)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[batch["aux_rows"], batch["aux_positions"]], batch["aux_targets"], reduction="none"
    )
    assert torch.allclose(token_losses, expected, atol=1e-4) and reaction_losses is None


def test_untied_lm_gets_its_own_aux_head_from_pi0(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)
    model.save_pretrained(tmp_path / "untied")
    critic = CriticModule(aux_next_message_coef=0.5, ensemble_size=2)
    critic.build(tmp_path / "untied")
    for _, _, lm_head in critic._members():
        assert lm_head is not None and torch.equal(lm_head.weight, model.lm_head.weight)
    assert "extra_members.0.lm_head.weight" in critic.state_dict()
    off = CriticModule()
    off.build(tmp_path / "untied")
    assert off.lm_head is None and not any("lm_head" in k for k in off.state_dict())


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_aux_loss_trains_and_reports_val_aux_loss(base_dir, tokenizer, conversations, ensemble_size):
    torch.manual_seed(0)
    dm = TrajectoryDataModule(val_fraction=0.3, critic_batch_size=16, conversation_rows=True)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    critic = CriticModule(lr=5e-3, aux_next_message_coef=1.0, ensemble_size=ensemble_size)
    critic.build(base_dir)
    losses = []
    with dm.for_phase("critic", next_messages=True, bootstrap_members=ensemble_size):
        for epochs in (1, 3):
            trainer = make_trainer(max_epochs=epochs)
            trainer.fit(critic, datamodule=dm)
            losses.append(float(trainer.callback_metrics["critic/val_aux_loss"]))
    assert math.isfinite(losses[0]) and losses[1] < losses[0]
    # Without next messages in the batches the setting is refused, naming it.
    with dm.for_phase("critic", bootstrap_members=ensemble_size):
        with pytest.raises(ValueError, match="aux_next_message_coef"):
            make_trainer(max_epochs=1).fit(critic, datamodule=dm)


def test_aux_loss_weighs_tokens_like_their_turns(base_dir, tokenizer, conversations):
    critic = CriticModule(aux_next_message_coef=1.0, ensemble_size=2)
    critic.build(base_dir)
    (batch, *_) = _next_message_batches(tokenizer, conversations, False, next_messages=True)
    tokens = batch["aux_targets"].numel()
    token_losses = torch.rand(2, tokens)
    turns = batch["target"].numel()
    counts = torch.zeros(2, turns)
    counts[0] = 1.0  # member 2 counts no turn: its aux loss is 0
    got = critic._aux_loss(token_losses, {**batch, "bootstrap": counts})
    assert got.item() == pytest.approx(token_losses[0].mean().item(), rel=1e-6)


# -- the customer's reaction at the readout ----------------------------------------------------------------------


def test_reaction_loss_predicts_each_next_message_token_from_the_features_q_reads(base_dir, tokenizer, conversations):
    torch.manual_seed(0)
    critic = CriticModule(readout="reply_mean", aux_reaction_coef=1.0, ensemble_size=2)
    critic.build(base_dir)
    assert [k for k in critic.state_dict() if k.startswith("reaction_maps")] == [
        "reaction_maps.0.weight",
        "reaction_maps.0.bias",
        "reaction_maps.1.weight",
        "reaction_maps.1.bias",
    ]
    critic.eval()
    (batch, *_) = _next_message_batches(tokenizer, conversations, True, next_messages=True)
    with torch.no_grad():
        q, next_losses, reaction_losses = critic._batch_outputs(batch)
        assert next_losses is None and reaction_losses.shape == (2, batch["aux_targets"].numel())
        for m, (backbone, head, _) in enumerate(critic._members()):
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            # By hand: each turn's mean hidden state over its reply's tokens, what the head reads.
            features = torch.stack(
                [
                    hidden[row, start : end + 1].mean(dim=0)
                    for row, start, end in zip(batch["read_rows"], batch["read_starts"], batch["read_positions"])
                ]
            )
            assert torch.allclose(head(features).squeeze(-1), q[m], atol=1e-5)
            # Every token of a turn's next message is predicted from that turn's features alone.
            mapped = critic.reaction_maps[m](features[batch["aux_turns"]])
            logits = mapped @ backbone.get_input_embeddings().weight.T
            expected = torch.nn.functional.cross_entropy(logits, batch["aux_targets"], reduction="none")
            assert torch.allclose(reaction_losses[m], expected, atol=1e-4)
    # Off, the critic saves what it saved before the setting existed.
    off = CriticModule(readout="reply_mean")
    off.build(base_dir)
    assert not any(k.startswith("reaction_maps") for k in off.state_dict())


def test_reaction_loss_trains_and_reports_val_reaction_loss(base_dir, tokenizer, conversations):
    torch.manual_seed(0)
    dm = TrajectoryDataModule(val_fraction=0.3, critic_batch_size=16, conversation_rows=True)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    critic = CriticModule(lr=5e-3, readout="reply_mean", aux_reaction_coef=1.0)
    critic.build(base_dir)
    losses = []
    with dm.for_phase("critic", next_messages=True):
        for epochs in (1, 3):
            trainer = make_trainer(max_epochs=epochs)
            trainer.fit(critic, datamodule=dm)
            assert "critic/val_aux_loss" not in trainer.callback_metrics  # the next-message loss is off
            losses.append(float(trainer.callback_metrics["critic/val_reaction_loss"]))
    assert math.isfinite(losses[0]) and losses[1] < losses[0]
    with dm.for_phase("critic"):
        with pytest.raises(ValueError, match="aux_reaction_coef"):
            make_trainer(max_epochs=1).fit(critic, datamodule=dm)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"aux_next_message_coef": -1.0}, "aux_next_message_coef"),
        ({"aux_reaction_coef": -0.5}, "aux_reaction_coef"),
        ({"head_hidden": -1}, "head_hidden"),
        ({"readout": "reply_surprise", "surprise_threshold": 1.0}, "surprise_threshold"),
        ({"readout": "reply_mean", "surprise_threshold": 0.05}, "surprise_threshold"),
        ({"early_stopping_patience": -1}, "early_stopping_patience"),
        ({"readout": "first"}, "readout"),
    ],
)
def test_bad_fitting_settings_name_the_key(kwargs, named):
    with pytest.raises(ValueError, match=named):
        CriticModule(**kwargs)


# -- early stopping ----------------------------------------------------------------------------------------------


def test_early_stopping_restores_the_best_epoch_and_reports_its_metrics(base_dir, tokenizer):
    import lightning as L

    class ValLosses(L.Callback):
        def __init__(self):
            self.losses, self.weights = [], []

        def on_train_epoch_end(self, trainer, module):
            self.losses.append(float(trainer.callback_metrics["critic/val_loss"]))
            self.weights.append(_weights(module))

    torch.manual_seed(0)
    dm = _toy_datamodule(tokenizer, n=32)
    critic = CriticModule(lr=0.05, early_stopping_patience=1)  # a high lr: the held-out loss soon goes up
    critic.build(base_dir)
    record = ValLosses()
    trainer = make_trainer(max_epochs=12, callbacks=[record])
    trainer.fit(critic, datamodule=dm)
    best = min(range(len(record.losses)), key=record.losses.__getitem__)
    metrics = trainer.callback_metrics
    assert int(metrics["critic/val_best_epoch"]) == best
    assert float(metrics["critic/val_loss"]) == pytest.approx(record.losses[best])
    assert len(record.losses) == int(metrics["critic/val_epochs_run"]) == best + 2 < 12  # one stale epoch, then stop
    now = _weights(critic)
    assert all(torch.equal(now[k], v) for k, v in record.weights[best].items() if "head" in k or "backbone" in k)
    # The restored weights give the best epoch's loss again.
    again = make_trainer().validate(critic, datamodule=dm, verbose=False)[0]["critic/val_loss"]
    assert again == pytest.approx(record.losses[best], abs=1e-5)


def test_early_stopping_off_trains_every_epoch(base_dir, tokenizer):
    torch.manual_seed(0)
    dm = _toy_datamodule(tokenizer, n=32)
    critic = CriticModule(lr=0.05)
    critic.build(base_dir)
    trainer = make_trainer(max_epochs=3)
    trainer.fit(critic, datamodule=dm)
    assert trainer.current_epoch == 3 and "critic/val_best_epoch" not in trainer.callback_metrics


# -- the within-state loss over branch pairs ----------------------------------------------------------------------


@pytest.mark.parametrize("ensemble_size", [1, 2])
def test_branch_contrast_adds_its_coefficient_times_the_paired_loss(base_dir, tokenizer, ensemble_size):
    from iterppo_lightning.rl.ppo_math import paired_difference_loss

    torch.manual_seed(0)
    dm = _toy_datamodule(tokenizer, n=16)
    batch = dm._collate_pairs(dm.train_examples)
    n = batch["target"].shape[0]
    batch["pair_first"], batch["pair_second"] = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    plain = CriticModule(ensemble_size=ensemble_size)
    plain.build(base_dir)
    with torch.no_grad():
        for _, head in _members(plain):
            head.weight.normal_(0, 1)  # Q differs from turn to turn
    contrast = CriticModule(ensemble_size=ensemble_size, branch_contrast_coef=3.0)
    contrast.backbone, contrast.head, contrast.extra_members = plain.backbone, plain.head, plain.extra_members
    for module in (plain, contrast):
        module.log = lambda *args, **kwargs: None
    with torch.no_grad():
        probs = torch.sigmoid(plain.batch_logits(batch)).reshape(ensemble_size, n)
        target = batch["target"]
        first, second = batch["pair_first"], batch["pair_second"]
        by_hand = paired_difference_loss(probs[:, first], probs[:, second], target[first], target[second]).sum()
        gap = contrast.training_step(batch, 0) - plain.training_step(batch, 0)
    assert by_hand > 0.01
    assert gap.item() == pytest.approx(3.0 * by_hand.item(), rel=1e-5)
    # A batch made without the pairs is refused, naming the setting.
    del batch["pair_first"], batch["pair_second"]
    with pytest.raises(ValueError, match="branch_contrast_coef"):
        contrast.training_step(batch, 0)
    with pytest.raises(ValueError, match="model.critic.branch_contrast_coef"):
        CriticModule(branch_contrast_coef=-1.0)


def test_a_bf16_fit_on_cpu_learns_with_eager_attention_and_gives_sdpa_back(base_dir, tokenizer):
    """bf16 on CPU: SDPA's bf16 kernel is slower than eager attention there (models/fused_ops.py)."""
    import lightning as L

    class RecordAttention(L.Callback):
        seen: set[str] = set()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.add(module.backbone.config._attn_implementation)

    torch.manual_seed(0)
    critic = CriticModule(lr=5e-3)
    critic.build(base_dir)
    assert critic.backbone.config._attn_implementation == "sdpa"
    record = RecordAttention()
    make_trainer(max_epochs=5, precision="bf16-mixed", callbacks=[record]).fit(
        critic, datamodule=_toy_datamodule(tokenizer)
    )
    assert record.seen == {"eager"}
    assert critic.backbone.config._attn_implementation == "sdpa"
    assert {p.dtype for p in critic.parameters()} == {torch.float32}
    ids, mask = _encode_pairs(tokenizer, [(o, "good") for o in OPENINGS] + [(o, "bad") for o in OPENINGS])
    q = critic.score(ids, mask)
    assert q[:4].min() > q[4:].max()
