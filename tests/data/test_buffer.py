"""Trajectory buffers on disk: exact round trip, never overwritten, atomic on failure."""

from __future__ import annotations

import copy

import datasets
import pytest

from iterppo_lightning.data.buffer import load_buffer, save_buffer
from iterppo_lightning.data.conversation import Conversation, Turn


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture()
def mixed_conversations(conversations):
    """Simulated conversations plus hand-made edge cases (abstain, empty metadata, unicode)."""
    convs = copy.deepcopy(conversations[:10])
    for c in convs:
        c.iteration, c.policy_id = 2, "pi_2"
    convs.append(
        Conversation(
            "edge",
            [
                Turn("héllo — ok?", suggestion=None, sent="our own message", business_action="reject"),
                Turn("bought", outcome=1),
            ],
            iteration=0,
            policy_id="",
            metadata={},
        )
    )
    return convs


def test_round_trip_equals_the_conversation_dicts(tmp_path, mixed_conversations):
    path = save_buffer(mixed_conversations, tmp_path / "buffer")
    assert path == tmp_path / "buffer"
    loaded = load_buffer(path)
    assert [c.to_dict() for c in loaded] == [c.to_dict() for c in mixed_conversations]
    # An abstain stays None (not "" or "None"), the terminal turn keeps sent=None.
    edge = loaded[-1]
    assert edge.turns[0].suggestion is None
    assert edge.turns[1].sent is None and edge.turns[1].terminal
    assert loaded[0].metadata["persona"] == mixed_conversations[0].metadata["persona"]


def test_refuses_to_overwrite_an_existing_buffer(tmp_path, mixed_conversations):
    path = tmp_path / "buffer"
    save_buffer(mixed_conversations[:3], path)
    with pytest.raises(FileExistsError, match="buffer"):
        save_buffer(mixed_conversations[3:], path)
    # The first buffer is intact and no temporary folder was left behind.
    assert [c.conversation_id for c in load_buffer(path)] == [c.conversation_id for c in mixed_conversations[:3]]
    assert _leftovers(tmp_path) == ["buffer"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_neither_the_buffer_nor_a_temporary_folder(
    tmp_path, monkeypatch, mixed_conversations, error
):
    real_save = datasets.Dataset.save_to_disk

    def half_write_then_fail(self, dataset_path, *args, **kwargs):
        real_save(self, dataset_path, *args, **kwargs)  # the temporary folder really exists ...
        raise error  # ... when the write fails

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_write_then_fail)
    out = tmp_path / "runs"
    out.mkdir()
    with pytest.raises(type(error)):
        save_buffer(mixed_conversations, out / "buffer")
    assert _leftovers(out) == []
    monkeypatch.undo()
    # The name is still free: a retry succeeds.
    save_buffer(mixed_conversations, out / "buffer")
    assert len(load_buffer(out / "buffer")) == len(mixed_conversations)


def test_creates_missing_parent_folders(tmp_path, mixed_conversations):
    path = save_buffer(mixed_conversations[:2], tmp_path / "a" / "b" / "buffer")
    assert len(load_buffer(path)) == 2


def test_loading_a_missing_buffer_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_buffer(missing)


def test_the_stored_turn_columns_are_the_turn_fields():
    """Buffers and Parquet logs both build their turn columns from TURN_FIELDS, with unchanged types."""
    import pyarrow as pa

    from iterppo_lightning.data.buffer import FEATURES
    from iterppo_lightning.data.conversation import TURN_FIELD_TYPES, TURN_FIELDS
    from iterppo_lightning.data.log_io import _parquet_schema

    assert tuple(TURN_FIELD_TYPES) == TURN_FIELDS
    assert tuple(FEATURES["turns"]) == TURN_FIELDS
    assert [FEATURES["turns"][key].feature.dtype for key in TURN_FIELDS] == ["string", "int64"] + ["string"] * 4
    schema = _parquet_schema()
    assert schema.names == ["conversation_id", "policy_id", "iteration", "metadata", "turns"]
    turn = schema.field("turns").type.value_type
    assert tuple(turn.field(i).name for i in range(turn.num_fields)) == TURN_FIELDS
    assert [turn.field(i).type for i in range(turn.num_fields)] == [pa.string(), pa.int64()] + [pa.string()] * 4


def test_a_buffer_without_a_later_turn_column_loads_with_its_default(tmp_path):
    """A buffer written before `timestamp` existed has no such column; its turns load with timestamp None."""
    from iterppo_lightning.data.buffer import FEATURES

    turn_columns = {k: v for k, v in FEATURES["turns"].items() if k != "timestamp"}
    features = datasets.Features({**FEATURES, "turns": turn_columns})
    turns = {
        "customer": ["hi", "bye"],
        "outcome": [0, 1],
        "suggestion": ["hello", None],
        "sent": ["hello", None],
        "business_action": ["accept", "none"],
    }
    row = {"conversation_id": "old", "iteration": 1, "policy_id": "pi_1", "metadata": "{}", "turns": turns}
    datasets.Dataset.from_list([row], features=features).save_to_disk(str(tmp_path / "old"))
    (conv,) = load_buffer(tmp_path / "old")
    assert [t.timestamp for t in conv.turns] == [None, None]
    assert [(t.customer, t.outcome, t.suggestion, t.business_action) for t in conv.turns] == [
        ("hi", 0, "hello", "accept"),
        ("bye", 1, None, "none"),
    ]
