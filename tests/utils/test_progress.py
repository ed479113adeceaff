"""Progress on stderr for long loops, and phase Trainers' bars that name their phase and iteration."""

from __future__ import annotations

import io
from types import SimpleNamespace

import lightning as L

from iterppo_lightning.utils.progress import Progress
from iterppo_lightning.utils.progress_bar import PhaseProgressBar, name_progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_short_work_prints_nothing():
    out, clock = io.StringIO(), Clock()
    with Progress("collect", 100, interval=10, stream=out, clock=clock) as progress:
        for done in range(1, 101):
            clock.now += 0.05
            progress.update(done)
    assert out.getvalue() == ""


def test_long_work_prints_done_of_total_periodically_and_a_last_line():
    out, clock = io.StringIO(), Clock()
    with Progress("collect", 20_000, interval=10, stream=out, clock=clock) as progress:
        for done in range(1_000, 20_001, 1_000):
            clock.now += 4  # 4 s per thousand conversations
            progress.update(done)
    lines = out.getvalue().splitlines()
    assert lines[0] == "collect: 3,000/20,000 conversations (15%), 12 s, about 1 min 8 s left"
    # A line at the first update 10 s after the last line (every 12 s here), and one at the end.
    assert [line.split()[1] for line in lines] == [
        "3,000/20,000",
        "6,000/20,000",
        "9,000/20,000",
        "12,000/20,000",
        "15,000/20,000",
        "18,000/20,000",
        "20,000/20,000",
    ]
    assert lines[-1] == "collect: 20,000/20,000 conversations (100%), 1 min 20 s"


def bar_description(max_epochs: int | None, max_steps: int, label: str = "critic · iteration 2") -> str:
    bar = PhaseProgressBar(label=label)
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps)
    return bar._get_train_description(0)


def test_a_phase_bar_names_phase_iteration_and_a_real_total():
    assert bar_description(3, -1) == "critic · iteration 2 · epoch 1/3"
    assert bar_description(-1, 40, "bc · pi_0") == "bc · pi_0 · 40 steps"  # Lightning would say "Epoch 0/-2"
    assert "-" not in bar_description(-1, 40).replace("bc", "")


def test_name_progress_bar_names_the_phase_bar_and_leaves_other_bars_alone():
    trainer = L.Trainer(callbacks=[PhaseProgressBar(label="ppo")], logger=False, enable_checkpointing=False)
    name_progress_bar(trainer, "ppo · iteration 2")
    assert trainer.progress_bar_callback.label == "ppo · iteration 2"
    plain = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    name_progress_bar(plain, "ppo · iteration 2")  # no bar: nothing to do


def test_run_episodes_reports_finished_conversations_of_the_total(tiny_model, tokenizer, monkeypatch):
    from iterppo_lightning.env import episodes
    from iterppo_lightning.env.sales_simulator import SalesSimulator

    reports: list[tuple[str, int, list[int]]] = []

    class Recording(Progress):
        def __init__(self, label: str, total: int, *args, **kwargs):
            super().__init__(label, total, *args, **kwargs)
            reports.append((label, total, []))

        def update(self, done: int) -> None:
            reports[-1][2].append(done)

    monkeypatch.setattr(episodes, "Progress", Recording)
    seeds = episodes.episode_seeds("collect", 0, 0, 6)
    episodes.run_episodes(tiny_model, tokenizer, SalesSimulator(), seeds, max_new_tokens=4, progress="collect")
    ((label, total, done),) = reports
    assert (label, total) == ("collect", 6)
    assert done == sorted(done) and done[-1] == 6  # one report per round, finished conversations so far
    episodes.run_episodes(tiny_model, tokenizer, SalesSimulator(), seeds, max_new_tokens=4)  # no label: no report
    assert len(reports) == 1
