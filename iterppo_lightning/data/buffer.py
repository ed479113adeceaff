"""Trajectory buffers: one Arrow dataset on disk per outer iteration.

Stored with Hugging Face `datasets` (memory-mapped on load). Writes go to a
temporary sibling folder that is renamed into place, so a crash never leaves
a half-written buffer under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from iterppo_lightning.data.conversation import TURN_FIELD_TYPES, TURN_FIELDS, Conversation, Turn
from iterppo_lightning.utils.atomic_io import atomic_dir
from iterppo_lightning.utils.failpoints import failpoint

# A turn field's type -> its column's dtype in a buffer. (One `Value` per column, not one shared object:
# the dataset's fingerprint in state.json hashes the pickled features, where a shared object pickles differently.)
_COLUMN_DTYPES = {str: "string", int: "int64"}

# A fixed schema keeps every buffer loadable together; metadata varies by
# source (simulator persona, log fields), so it is stored as a JSON string.
FEATURES = datasets.Features(
    {
        "conversation_id": datasets.Value("string"),
        "iteration": datasets.Value("int64"),
        "policy_id": datasets.Value("string"),
        "metadata": datasets.Value("string"),
        "turns": datasets.Sequence({key: datasets.Value(_COLUMN_DTYPES[TURN_FIELD_TYPES[key]]) for key in TURN_FIELDS}),
    }
)


def _to_row(conv: Conversation) -> dict:
    return {
        "conversation_id": conv.conversation_id,
        "iteration": conv.iteration,
        "policy_id": conv.policy_id,
        "metadata": json.dumps(conv.metadata, sort_keys=True),
        "turns": {key: [getattr(t, key) for t in conv.turns] for key in TURN_FIELDS},
    }


def _cell(key: str, value):
    return int(value) if TURN_FIELD_TYPES[key] is int else value


def _from_row(row: dict) -> Conversation:
    cols = row["turns"]
    # A buffer written before a field existed (e.g. timestamp) has no column for it: the field keeps its default.
    keys = [key for key in TURN_FIELDS if key in cols]
    turns = [Turn(**{key: _cell(key, cols[key][i]) for key in keys}) for i in range(len(cols[TURN_FIELDS[0]]))]
    return Conversation(
        conversation_id=row["conversation_id"],
        turns=turns,
        iteration=int(row["iteration"]),
        policy_id=row["policy_id"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
    )


def save_buffer(conversations: list[Conversation], path: str | Path) -> Path:
    """Write conversations as an Arrow dataset at `path`, atomically (write then rename)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"buffer {str(path)!r} already exists; buffers are never overwritten")
    rows = [_to_row(c) for c in conversations]
    with atomic_dir(path) as tmp:
        datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(tmp))
        failpoint("buffer.before_rename")
    return path


def load_buffer(path: str | Path) -> list[Conversation]:
    """Read a buffer written by `save_buffer` (memory-mapped Arrow)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"buffer {str(path)!r} does not exist")
    ds = datasets.load_from_disk(str(path))
    return [_from_row(row) for row in ds]


def buffer_conversation_ids(path: str | Path) -> list[str]:
    """The conversation ids of a buffer (one column read; the turns are not decoded)."""
    return list(datasets.load_from_disk(str(path))["conversation_id"])
