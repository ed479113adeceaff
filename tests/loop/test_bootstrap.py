"""pi_0's imagined data: which turns are informed recommendations, and the BC curriculum's data restriction."""

from __future__ import annotations

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.env.sales_simulator import SalesSimulator, SimulatorConfig
from iterppo_lightning.env.scripted_agents import BehaviourAgent
from iterppo_lightning.loop.bootstrap import imagine_conversations, informed_recommendation_turns


def _turn(customer: str, suggestion: str) -> Turn:
    return Turn(customer, 0, suggestion, suggestion, "accept")


def test_informed_recommendation_turns_marks_recommendations_after_the_need_was_told():
    conv = Conversation(
        "c",
        [
            _turn("hi , can you help me ?", "how about the basic phone ?"),  # blind: need unknown
            _turn("i do not need a phone .", "what are you looking for ?"),  # a question, not a recommendation
            _turn("i am looking for a laptop .", "how about the premium laptop ?"),  # informed
            Turn("that is not in my price range ."),
        ],
    )
    assert informed_recommendation_turns(conv) == [2]


def test_imagined_conversations_carry_their_informed_turns():
    agent = BehaviourAgent(informed_prob=1.0, skip_known_questions=True)
    convs = imagine_conversations(SalesSimulator(SimulatorConfig()), agent, list(range(60)))
    labelled = [c.metadata["informed_recommendation_turns"] for c in convs]
    assert any(labelled) and not all(labelled)
    for conv, turns in zip(convs, labelled):
        assert turns == informed_recommendation_turns(conv)


def test_sft_turns_keep_only_the_given_turns(tokenizer, conversations):
    dm = TrajectoryDataModule(val_fraction=0.0, sft_batch_size=4)
    dm.connect(tokenizer)
    dm.set_conversations(conversations)
    keep = {(conversations[0].conversation_id, conversations[0].agent_turns[0]), (conversations[1].conversation_id, 0)}
    with dm.for_phase("sft", sft_turns=keep):
        batches = list(dm.train_dataloader())
    assert sum(b["target"].shape[0] for b in batches) == 2  # one entry per cloned turn
    with dm.for_phase("sft"):
        assert sum(b["target"].shape[0] for b in dm.train_dataloader()) == len(dm.train_examples)


class _RecordingTrainer:
    """Stands in for a Lightning Trainer: records what each fit was asked to train."""

    def __init__(self, fits: list, kwargs: dict):
        self.fits, self.kwargs, self.callback_metrics = fits, kwargs, {}

    def fit(self, module, datamodule=None):
        self.fits.append((module.lr_schedule, self.kwargs))


def test_the_rate_schedule_applies_to_the_epochs_and_not_to_the_curriculum(tokenizer, conversations, tiny_model):
    from iterppo_lightning.loop.bootstrap import BootstrapConfig, behaviour_clone
    from iterppo_lightning.loop.config import FilteredBCConfig

    def fits_of(config, curriculum):
        fits = []
        dm = TrajectoryDataModule(val_fraction=0.0)
        factory = lambda phase, **kwargs: _RecordingTrainer(fits, kwargs)  # noqa: E731
        behaviour_clone(tiny_model, tokenizer, conversations, config, dm, factory, ".", curriculum)
        return [(schedule, kwargs.get("max_steps"), kwargs.get("max_epochs")) for schedule, kwargs in fits]

    some_turn = {(conversations[0].conversation_id, conversations[0].agent_turns[0])}
    config = BootstrapConfig(epochs=3, curriculum_steps=5, lr_schedule="linear")
    assert fits_of(config, some_turn) == [("constant", 5, -1), ("linear", None, 3)]
    # The filtered-BC baseline's settings have no schedule key: its fine-tune keeps a constant rate.
    assert fits_of(FilteredBCConfig(epochs=2), None) == [("constant", None, 2)]
