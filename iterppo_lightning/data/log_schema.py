"""The log schema and the checks of one record.

A log record is one conversation, exactly ``Conversation.to_dict()``. Real logs
come from a business's own systems, so every field is checked before anything
is trained on it: a wrong outcome flag or a turn in the wrong place silently
changes the rewards the critic learns from. The schema in words is in
``docs/data.md``; the checks of a whole file (line numbers, duplicate ids,
file formats) are in ``log_io``.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from iterppo_lightning.data.conversation import TURN_FIELDS, Conversation, Turn

__all__ = [
    "LogProblem",
    "check_record",
    "kept_extra_fields",
    "check_max_message_chars",
    "DEFAULT_MAX_MESSAGE_CHARS",
    "TOP_LEVEL_FIELDS",
    "AGENT_ACTIONS",
    "parse_timestamp",
]

TOP_LEVEL_FIELDS = ("conversation_id", "policy_id", "iteration", "metadata", "turns")
AGENT_ACTIONS = ("accept", "edit", "reject")
"""What the business may do with an agent turn's suggestion; the terminal turn has "none"."""

MESSAGE_FIELDS = ("customer", "suggestion", "sent")
"""The text fields of a turn, whose length `max_message_chars` limits."""
DEFAULT_MAX_MESSAGE_CHARS = 20_000
"""The default of data.max_message_chars: far above any chat message, far below what makes tokenizing a batch slow.
One message of 50 MB passed every other check, then made the critic phase take minutes and gigabytes."""

DOCS = "docs/data.md"
# Keys of common chat formats (OpenAI / HF chat templates, ShareGPT); a record with
# them is the wrong *kind* of data, which deserves a clearer hint than "unknown field".
_CHAT_KEYS = {"messages", "conversations", "conversation", "dialog", "dialogue", "chat"}
_CHAT_TURN_KEYS = {"role", "content", "from", "value", "speaker", "text"}
# pandas writes a non-default index into Parquet as such columns; it is an artefact
# of how the file was written, not a field of the user's data.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class LogProblem:
    """One thing wrong with a log file, precise enough to find and fix it."""

    file: str
    location: str
    """``"line 3"`` (JSON lines), ``"row 3"`` (Parquet / HF folder), ``""`` for the whole file."""
    field: str
    """Path of the field, like ``"turns[2].outcome"``; ``""`` for the whole record."""
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.location}" if self.location else self.file
        parts = [where, self.field, self.message] if self.field else [where, self.message]
        return ": ".join(parts)


# ---------------------------------------------------------------------- helpers
def _show(value: Any) -> str:
    """A value as a problem message shows it: type for containers, repr (shortened) otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `"iteration": true` is a mistake, not an iteration.
    return isinstance(value, int) and not isinstance(value, bool)


def _non_empty_string(record: dict, key: str, problems: Problems, what: str) -> str | None:
    """Check a required, non-blank string field; return it when valid."""
    if key not in record or record[key] is None:
        problems.append((key, f"missing required field ({what}, a non-empty string)"))
        return None
    value = record[key]
    if not isinstance(value, str):
        problems.append((key, f"expected a non-empty string, got {_show(value)}"))
        return None
    if not value.strip():
        problems.append((key, f"must not be empty ({what})"))
        return None
    return value


def parse_timestamp(text: str) -> dt.datetime | None:
    """An ISO 8601 string as a datetime, or None when it does not parse.

    ``datetime.fromisoformat`` accepts a trailing ``Z`` only from Python 3.11;
    it is mapped to ``+00:00`` here so 3.10 reads the same logs.
    """
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        pass
    if text[-1:] in ("Z", "z"):
        try:
            return dt.datetime.fromisoformat(text[:-1] + "+00:00")
        except ValueError:
            return None
    return None


def _unknown_key_message(key: str, known: tuple[str, ...], elsewhere: tuple[str, ...], where: str) -> str:
    """Name an unknown key, with the most likely intended field when there is one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return f"unknown field {key!r} (did you mean {close[0]!r}?)"
    misplaced = difflib.get_close_matches(key, elsewhere, n=1, cutoff=0.75)
    if misplaced:
        return f"unknown field {key!r}: {misplaced[0]!r} is a field of {where}"
    return f"unknown field {key!r}; allowed: {', '.join(known)} (see {DOCS})"


# ---------------------------------------------------------------------- top level
def _extra_field_problem(key: str) -> str | None:
    """Why an extra top-level field cannot be kept in metadata (a likely mistake), or None to keep it.

    Business exports carry columns of their own (shop_id, agent_name, ...): those are kept. A field that looks
    like a misspelt or misplaced schema field, or like chat-format messages, is a mistake to report instead:
    keeping `outcomes` as metadata would silently drop the outcome it was meant to be.
    """
    if key.lower() in _CHAT_KEYS:
        return (
            f"unknown field {key!r}: this looks like chat-format messages; conversation logs "
            f"need conversation_id, policy_id and turns with customer, outcome, suggestion, "
            f"sent and business_action (see {DOCS})"
        )
    close = difflib.get_close_matches(key, TOP_LEVEL_FIELDS, n=1, cutoff=0.75)
    if close:
        return f"unknown field {key!r} (did you mean {close[0]!r}?)"
    # Stricter for turn fields: `outcomes` is a misplaced outcome, `customer_id` a business's own column.
    misplaced = difflib.get_close_matches(key, TURN_FIELDS, n=1, cutoff=0.85)
    if misplaced:
        return f"unknown field {key!r}: {misplaced[0]!r} is a field of each turn (inside turns)"
    return None


def kept_extra_fields(record: dict, tabular: bool = False) -> list[str]:
    """The record's extra top-level fields that `check_record` keeps under `metadata` (in record order)."""
    return [
        str(key)
        for key in record
        if key not in TOP_LEVEL_FIELDS
        and not (tabular and _PANDAS_INDEX.fullmatch(str(key)))
        and _extra_field_problem(str(key)) is None
    ]


def _check_extra_fields(record: dict, problems: Problems, tabular: bool) -> dict[str, Any]:
    """Report extra top-level fields that look like mistakes; return the others (kept in metadata), JSON-safe."""
    kept: dict[str, Any] = {}
    for key in record:
        if key in TOP_LEVEL_FIELDS or (tabular and _PANDAS_INDEX.fullmatch(str(key))):
            continue
        problem = _extra_field_problem(str(key))
        if problem is not None:
            problems.append((str(key), problem))
            continue
        try:
            kept[str(key)] = _json_value(record[key])
        except TypeError as err:
            problems.append((str(key), f"an extra field is kept in metadata, which holds JSON values: {err}"))
    return kept


def _json_value(value: Any) -> Any:
    """A column's value as metadata (JSON) can hold it: times as ISO strings; TypeError for what JSON cannot hold."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # how pandas writes a missing value; JSON has no NaN
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"got {type(value).__name__} {_show(value)}; store it as text or drop the column")


def _check_iteration(record: dict, problems: Problems) -> int:
    value = record.get("iteration")
    if value is None:  # optional; null is the same as absent (a table has no "absent")
        return 0
    if not _is_int(value) or value < 0:
        problems.append(("iteration", f"expected an int >= 0, got {_show(value)}"))
        return 0
    return value


def _check_metadata(record: dict, problems: Problems, tabular: bool) -> dict:
    value = record.get("metadata")
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if tabular and isinstance(value, str):
        # Tables need one type per column, and metadata differs between sources,
        # so our buffers (and the Parquet files write_logs makes) store it as JSON text.
        if not value.strip():
            return {}
        try:
            parsed = json.loads(value)
        except ValueError as err:
            problems.append(("metadata", f"a metadata string must be JSON of an object; not valid JSON: {err}"))
            return {}
        if not isinstance(parsed, dict):
            problems.append(("metadata", f"a metadata string must be JSON of an object, got {_show(parsed)}"))
            return {}
        return parsed
    allowed = "an object or a JSON string of an object" if tabular else "an object"
    problems.append(("metadata", f"expected {allowed}, got {_show(value)}"))
    return {}


def _check_policy_id(record: dict, problems: Problems, known: set[str] | None) -> str | None:
    policy_id = _non_empty_string(record, "policy_id", problems, "the policy that made the suggestions")
    if policy_id is not None and known is not None and policy_id not in known:
        listed = ", ".join(sorted(known)) or "(none)"
        problems.append(("policy_id", f"unknown policy id {policy_id!r}; known: {listed}"))
        return None
    return policy_id


# ---------------------------------------------------------------------- turns
def _columnar_to_rows(columns: dict, problems: Problems) -> list[dict] | None:
    """Turns stored as a dict of equal-length lists (our Arrow buffers) -> a list of turn dicts."""
    lists = {}
    for key, value in columns.items():
        if value is None:  # a struct field a table lacks for this row: the key is absent
            continue
        if not isinstance(value, (list, tuple)):
            problems.append((f"turns.{key}", f"columnar turns need a list per field, got {_show(value)}"))
            return None
        lists[key] = value
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key} {n}" for key, n in lengths.items())
        problems.append(("turns", f"columnar turns have lists of unequal lengths: {shown}"))
        return None
    n = next(iter(lengths.values()), 0)
    return [{key: value[i] for key, value in lists.items()} for i in range(n)]


def _turn_list(record: dict, problems: Problems, tabular: bool) -> list | None:
    if "turns" not in record or record["turns"] is None:
        problems.append(("turns", "missing required field (a non-empty list of turns)"))
        return None
    turns = record["turns"]
    if tabular and isinstance(turns, dict):
        turns = _columnar_to_rows(turns, problems)
        if turns is None:
            return None
    if not isinstance(turns, (list, tuple)):
        # Columnar turns are how tables store lists of structs; in JSON they are a mistake.
        hint = ""
        if isinstance(turns, dict):
            hint = " (columnar turns, a dict of lists, are read from Parquet / HF folders only)"
        problems.append(("turns", f"expected a non-empty list of turns, got {_show(turns)}{hint}"))
        return None
    if not turns:
        problems.append(("turns", "must not be empty: a conversation needs agent turns and a terminal turn"))
        return None
    return list(turns)


def _check_outcome(turn: dict, path: str, problems: Problems) -> int | None:
    if "outcome" not in turn:
        problems.append((f"{path}.outcome", "missing required field (0 or 1)"))
        return None
    value = turn["outcome"]
    if isinstance(value, bool) or (_is_int(value) and value in (0, 1)):
        return int(value)
    hint = "; floats are not accepted: store outcome as an int or bool column" if isinstance(value, float) else ""
    problems.append((f"{path}.outcome", f"expected 0 or 1 (int or true/false), got {_show(value)}{hint}"))
    return None


def _check_timestamp(turn: dict, path: str, problems: Problems) -> tuple[str | None, dt.datetime | None]:
    """The timestamp as an ISO string (as written, or from a datetime) and parsed; None when absent."""
    value = turn.get("timestamp")
    if value is None:
        return None, None
    if isinstance(value, dt.datetime):
        return value.isoformat(), value
    if isinstance(value, dt.date):  # a Parquet date column
        return value.isoformat(), dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, str):
        problems.append((f"{path}.timestamp", f"expected an ISO 8601 string or null, got {_show(value)}"))
        return None, None
    parsed = parse_timestamp(value)
    if parsed is None:
        problems.append((f"{path}.timestamp", f"not an ISO 8601 time (e.g. 2026-11-02T10:15:00Z): {_show(value)}"))
        return None, None
    return value, parsed


def _check_turn_keys(turn: dict, path: str, problems: Problems) -> None:
    for key in turn:
        if key in TURN_FIELDS:
            continue
        if str(key).lower() in _CHAT_TURN_KEYS:
            message = (
                f"unknown field {key!r}: this looks like a chat-format message; a turn holds the "
                f"customer's message and what the business sent (see {DOCS})"
            )
        else:
            message = _unknown_key_message(str(key), TURN_FIELDS, TOP_LEVEL_FIELDS, "the conversation (top level)")
        problems.append((f"{path}.{key}", message))


def _check_agent_turn(turn: dict, path: str, outcome: int | None, problems: Problems) -> None:
    """Rules of every turn but the last: the agent suggested (or abstained) and the business sent."""
    sent = turn.get("sent")
    if sent is None:
        problems.append(
            (f"{path}.sent", "missing: an agent turn needs the message the business sent (a non-empty string)")
        )
    elif not isinstance(sent, str):
        problems.append((f"{path}.sent", f"expected a non-empty string, got {_show(sent)}"))
        sent = None
    elif not sent.strip():
        problems.append((f"{path}.sent", "must not be empty: an agent turn needs the message the business sent"))
        sent = None

    suggestion_ok = True
    if "suggestion" not in turn:
        problems.append(
            (
                f"{path}.suggestion",
                "missing: an agent turn needs suggestion (a string, or null when the agent abstained)",
            )
        )
        suggestion_ok = False
    elif turn["suggestion"] is not None and not isinstance(turn["suggestion"], str):
        problems.append((f"{path}.suggestion", f"expected a string or null (abstain), got {_show(turn['suggestion'])}"))
        suggestion_ok = False
    suggestion = turn.get("suggestion")

    action = turn.get("business_action")
    if action not in AGENT_ACTIONS:
        why = " ('none' marks the terminal turn only)" if action == "none" else ""
        got = "nothing" if "business_action" not in turn else _show(action)
        problems.append((f"{path}.business_action", f"expected one of accept, edit, reject{why}, got {got}"))
    elif suggestion_ok and suggestion is None and action != "reject":
        problems.append(
            (
                f"{path}.business_action",
                f"the agent abstained (suggestion null), so the business wrote its own message: "
                f"business_action must be 'reject', got {action!r}",
            )
        )
    elif action == "accept" and suggestion_ok and sent is not None and sent != suggestion:
        problems.append(
            (
                f"{path}.sent",
                "business_action is 'accept' but sent differs from suggestion; "
                "use 'edit' when the business changed the text",
            )
        )

    if outcome == 1:
        problems.append(
            (
                f"{path}.outcome",
                "outcome 1 before the last turn: a conversation ends at its outcome, "
                "so only the last turn may have outcome 1",
            )
        )


def _check_terminal_turn(turn: dict, path: str, problems: Problems) -> None:
    """The last turn is the customer's last message and the outcome: nothing was suggested or sent."""
    for key in ("sent", "suggestion"):
        if turn.get(key) is not None:
            problems.append(
                (
                    f"{path}.{key}",
                    f"the last turn is terminal (the customer's last message and the outcome): "
                    f"{key} must be absent or null, got {_show(turn[key])}",
                )
            )
    action = turn.get("business_action")
    if action not in (None, "none"):
        problems.append(
            (
                f"{path}.business_action",
                f"the last turn is terminal: business_action must be absent, null or 'none', got {_show(action)}",
            )
        )


def _check_message_lengths(turn: dict, path: str, limit: int | None, problems: Problems) -> None:
    if limit is None:
        return
    for key in MESSAGE_FIELDS:
        value = turn.get(key)
        if isinstance(value, str) and len(value) > limit:
            problems.append(
                (
                    f"{path}.{key}",
                    f"a message of {len(value):,} characters, over the limit of {limit:,} (data.max_message_chars; "
                    "cut or drop the message, or raise the limit)",
                )
            )


def _check_turns(turns: list, problems: Problems, max_message_chars: int | None) -> list[Turn]:
    """Check every turn; the Turns are meaningful only when no problem was added."""
    out: list[Turn] = []
    last = len(turns) - 1
    previous: tuple[str, dt.datetime] | None = None
    for i, turn in enumerate(turns):
        path = f"turns[{i}]"
        if not isinstance(turn, dict):
            problems.append((path, f"expected an object (one turn), got {_show(turn)}"))
            continue
        _check_turn_keys(turn, path, problems)
        _check_message_lengths(turn, path, max_message_chars, problems)
        customer = turn.get("customer")
        if customer is None:
            problems.append(
                (f"{path}.customer", "missing required field (the customer's message, a string; may be empty)")
            )
        elif not isinstance(customer, str):
            problems.append((f"{path}.customer", f"expected a string, got {_show(customer)}"))
        outcome = _check_outcome(turn, path, problems)
        stamp, parsed = _check_timestamp(turn, path, problems)
        if parsed is not None:
            previous = _check_order(previous, (path, parsed), problems)
        if i < last:
            _check_agent_turn(turn, path, outcome, problems)
            out.append(
                Turn(
                    customer=customer,
                    outcome=outcome if outcome is not None else 0,
                    suggestion=turn.get("suggestion"),
                    sent=turn.get("sent"),
                    business_action=turn.get("business_action"),
                    timestamp=stamp,
                )
            )
        else:
            _check_terminal_turn(turn, path, problems)
            out.append(Turn(customer=customer, outcome=outcome if outcome is not None else 0, timestamp=stamp))
    if len(turns) == 1:
        problems.append(("turns", "only a terminal turn: a conversation needs at least one agent turn before it"))
    return out


def _check_order(
    previous: tuple[str, dt.datetime] | None, current: tuple[str, dt.datetime], problems: Problems
) -> tuple[str, dt.datetime]:
    """Timestamps must not decrease; returns the timestamp later ones are compared with."""
    if previous is None:
        return current
    (prev_path, prev), (path, now) = previous, current
    try:
        decreasing = now < prev
    except TypeError:  # naive vs aware: the order is unknowable without a guess
        if now.tzinfo is not None:
            message = f"has a time zone but {prev_path}.timestamp has none; use one form in a conversation"
        else:
            message = f"has no time zone but {prev_path}.timestamp has one; use one form in a conversation"
        problems.append((f"{path}.timestamp", message))
        return current
    if decreasing:
        problems.append(
            (
                f"{path}.timestamp",
                f"earlier than {prev_path}.timestamp ({now.isoformat()} < {prev.isoformat()}); "
                "timestamps must not decrease",
            )
        )
        return previous
    return current


def _merge_extras(metadata: dict, extras: dict[str, Any], problems: Problems) -> dict:
    """metadata with the extra fields added; a field that is also a metadata key with another value is a problem."""
    if not extras:
        return metadata
    merged = dict(metadata)
    for key, value in extras.items():
        if key in merged and merged[key] != value:
            problems.append(
                (key, f"extra field {key!r} is kept in metadata, which already has {key!r} with another value")
            )
        merged[key] = value
    return merged


def check_max_message_chars(value: int | None, key: str = "data.max_message_chars") -> None:
    """Refuse a limit that is not None or an int >= 1, naming the setting."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{key} must be an int >= 1 (or null for no limit), got {value!r}")


# ---------------------------------------------------------------------- public
def check_record(
    record: Any,
    *,
    known_policy_ids: set[str] | None = None,
    tabular: bool = False,
    max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS,
) -> tuple[list[tuple[str, str]], Conversation | None]:
    """(field, message) problems of one record, and the Conversation when it has none.

    Extra top-level fields (a business's own columns, e.g. ``shop_id``) are kept
    under ``metadata``; one that looks like a misspelt or misplaced schema field
    is a problem. A customer message, suggestion or sent message longer than
    ``max_message_chars`` characters is a problem (None: no limit).

    Timestamps are normalised to ISO strings (Parquet datetimes become
    ``isoformat()``; strings are kept as written, so a round trip is exact).
    ``tabular=True`` is for rows of Parquet files and HF folders: there
    ``metadata`` may be a JSON string and ``turns`` may be columnar (a dict of
    equal-length lists), the two ways a table stores what JSON holds directly.
    Checks that span records (unique ``conversation_id``) are ``log_io``'s.
    """
    if not isinstance(record, dict):
        return [("", f"expected an object (one conversation), got {_show(record)}")], None
    problems: Problems = []
    extras = _check_extra_fields(record, problems, tabular)
    conversation_id = _non_empty_string(record, "conversation_id", problems, "the conversation's id")
    policy_id = _check_policy_id(record, problems, known_policy_ids)
    iteration = _check_iteration(record, problems)
    metadata = _merge_extras(_check_metadata(record, problems, tabular), extras, problems)
    turn_list = _turn_list(record, problems, tabular)
    turns = _check_turns(turn_list, problems, max_message_chars) if turn_list is not None else []
    if problems:
        return problems, None
    return [], Conversation(
        conversation_id=conversation_id,
        turns=turns,
        iteration=iteration,
        policy_id=policy_id,
        metadata=metadata,
    )
