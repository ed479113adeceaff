"""BehaviourCloningModule: next-token loss on reply tokens only, the same in one pass per conversation as per turn."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.modules.sft import BehaviourCloningModule


def _setup(tiny_model, tokenizer, conversations):
    dm = TrajectoryDataModule(val_fraction=0.0, conversation_rows=True)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    dm.use_phase("sft")
    assert len(dm.train_sequences) == len(conversations) < len(dm.train_examples), "plain conversations pack"
    module = BehaviourCloningModule()
    module.attach(tiny_model)
    tiny_model.eval()
    return dm, module


def _reply_losses(losses: torch.Tensor, row: int, start: int, end: int) -> torch.Tensor:
    return losses[row, start - 1 : end - 1]  # entry t is the loss of token t + 1


def test_one_pass_per_conversation_gives_each_reply_token_the_loss_of_its_own_row(tiny_model, tokenizer, conversations):
    dm, module = _setup(tiny_model, tokenizer, conversations)
    per_turn, one_pass = dm._collate_pairs(dm.train_examples), dm._collate_sequences(dm.train_sequences)
    with torch.no_grad():
        expected, got = module.token_losses(per_turn), module.token_losses(one_pass)
    k, worst = 0, 0.0
    for row, sequence in enumerate(dm.train_sequences):
        for e, start, end in zip(sequence.turns, sequence.reply_starts, sequence.reply_ends):
            p, a = len(e.prompt_ids), len(e.action_ids)
            mine, theirs = _reply_losses(got, row, start, end), _reply_losses(expected, k, p, p + a)
            assert mine.shape == theirs.shape == (a,)
            worst = max(worst, float((mine - theirs).abs().max()))
            assert mine.mean().item() == pytest.approx(theirs.mean().item(), abs=1e-5)  # the turn's loss
            k += 1
    assert k == len(dm.train_examples) and worst <= 1e-5
    # Only reply tokens carry a loss: the batch loss is the same token mean.
    assert int((one_pass["labels"] != -100).sum()) == int((per_turn["labels"] != -100).sum())
    with torch.no_grad():
        assert module._loss(one_pass).item() == pytest.approx(module._loss(per_turn).item(), abs=1e-5)


def test_cloning_some_turns_learns_their_replies_only(tiny_model, tokenizer, conversations):
    dm, module = _setup(tiny_model, tokenizer, conversations)
    chosen = {(c.conversation_id, i) for c in conversations for i in c.agent_turns[: len(c.agent_turns) // 2 + 1 : 2]}
    with dm.for_phase("sft", sft_turns=chosen):
        sequences = dm._phase_sequences(dm.train_sequences)
        cloned = dm._sft_examples(dm.train_examples)
    assert 0 < len(cloned) < len(dm.train_examples)
    assert [(t.conversation_id, t.turn_index) for s in sequences for t in s.turns] == [
        (e.conversation_id, e.turn_index) for e in cloned
    ]
    one_pass, per_turn = dm._collate_sequences(sequences), dm._collate_pairs(cloned)
    assert int((one_pass["labels"] != -100).sum()) == sum(len(e.action_ids) for e in cloned)
    with torch.no_grad():
        assert module._loss(one_pass).item() == pytest.approx(module._loss(per_turn).item(), abs=1e-5)


def test_bc_loss_share_counts_label_tokens(tiny_model, tokenizer, conversations, monkeypatch):
    import iterppo_lightning.modules.sft as sft_module

    counts = []
    monkeypatch.setattr(sft_module, "global_share", lambda n: counts.append(int(n)))  # one process: None
    dm, module = _setup(tiny_model, tokenizer, conversations[:6])
    batch = dm._collate_sequences(dm.train_sequences)
    module.training_step(batch, 0)
    assert counts == [sum(len(e.action_ids) for e in dm.train_examples)]


class _RecordRates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit_rates(tiny_model, tokenizer, conversations, schedule: str, epochs: int = 2) -> list[float]:
    dm, _ = _setup(tiny_model, tokenizer, conversations)
    module = BehaviourCloningModule(lr=1e-3, lr_schedule=schedule)
    module.attach(tiny_model)
    record = _RecordRates()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
    )
    with dm.for_phase("sft", batch_size=2):
        trainer.fit(module, datamodule=dm)
    return record.rates


def test_linear_schedule_decays_the_rate_to_zero_over_every_epoch(tiny_model, tokenizer, conversations):
    rates = _fit_rates(tiny_model, tokenizer, conversations, "linear")
    steps = len(rates)
    assert steps >= 4  # two epochs of several batches: the decay spans both, it does not restart per epoch
    assert rates == pytest.approx([1e-3 * (1 - i / steps) for i in range(steps)], rel=1e-6)
    assert _fit_rates(tiny_model, tokenizer, conversations, "constant") == [1e-3] * steps


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule must be constant or linear, got 'cosine'"):
        BehaviourCloningModule(lr_schedule="cosine")
