"""Conversation logs: every malformed input is reported at its exact place; valid logs round-trip exactly."""

from __future__ import annotations

import copy
import hashlib
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_conversations

from iterppo_lightning.data.buffer import load_buffer, save_buffer
from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.data.log_io import (
    LogValidationError,
    logs_fingerprint,
    read_logs,
    summarize_logs,
    validate_logs,
    write_logs,
)
from iterppo_lightning.data.log_schema import LogProblem, check_record

BAD_LINE = 3
"""Where the malformed record sits in each test file: valid lines surround it."""


def sim_records(n: int = 3) -> list[dict]:
    """Valid simulated conversations as log records (the simulator leaves policy_id empty)."""
    out = []
    for conv in make_conversations(n, seed0=2000):
        conv.policy_id = "pi_0"
        out.append(conv.to_dict())
    return out


SIM = sim_records(3)


def base() -> dict:
    """The schema's own example: accept, abstain (reject with our own words), a terminal success."""
    return {
        "conversation_id": "c-x",
        "policy_id": "pi_0",
        "iteration": 0,
        "metadata": {"source": "crm"},
        "turns": [
            {
                "customer": "hi there",
                "outcome": 0,
                "suggestion": "what do you need ?",
                "sent": "what do you need ?",
                "business_action": "accept",
                "timestamp": "2026-11-02T10:15:00Z",
            },
            {
                "customer": "a laptop",
                "outcome": 0,
                "suggestion": None,
                "sent": "our own words",
                "business_action": "reject",
                "timestamp": "2026-11-02T10:16:00Z",
            },
            {"customer": "ok i will buy it", "outcome": 1, "suggestion": None, "sent": None, "business_action": "none"},
        ],
    }


def mutated(change) -> dict:
    record = base()
    change(record)
    return record


def line(record) -> bytes:
    return (json.dumps(record) + "\n").encode()


def around(bad: bytes) -> list[bytes]:
    """Valid, valid, BAD (line 3), valid."""
    return [line(SIM[0]), line(SIM[1]), bad, line(SIM[2])]


def at_line(*fields: str) -> set[tuple[str, str]]:
    return {(f"line {BAD_LINE}", f) for f in fields}


def _set(path: str, value):
    """A change that sets record[...path...] = value; path like 'turns.2.outcome'."""

    def change(record):
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value

    return change


def _del(path: str):
    def change(record):
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        del target[last]

    return change


def _lone_terminal(record):
    record["turns"] = record["turns"][-1:]


# (id, file lines, expected {(location, field)}, validate_logs kwargs, text the messages must contain)
JSONL_CASES = [
    ("broken_json", around(b'{"conversation_id": "c-x", "policy_id" "pi_0"}\n'), at_line(""), {}, "not valid JSON"),
    ("invalid_utf8", around(b'{"conversation_id": "c-\xff\xfe"}\n'), at_line(""), {}, "not valid UTF-8"),
    ("json_array", around(b'[{"conversation_id": "c-x"}]\n'), at_line(""), {}, "got an array"),
    ("json_string", around(b'"hello"\n'), at_line(""), {}, "got a string 'hello'"),
    (
        "duplicate_json_key",
        around(b'{"conversation_id": "a", "conversation_id": "b"}\n'),
        at_line(""),
        {},
        "duplicate key",
    ),
    (
        "missing_conversation_id",
        around(line(mutated(_del("conversation_id")))),
        at_line("conversation_id"),
        {},
        "missing",
    ),
    (
        "empty_conversation_id",
        around(line(mutated(_set("conversation_id", "")))),
        at_line("conversation_id"),
        {},
        "empty",
    ),
    ("int_conversation_id", around(line(mutated(_set("conversation_id", 7)))), at_line("conversation_id"), {}, "got 7"),
    (
        "duplicate_conversation_id",
        around(line(mutated(_set("conversation_id", SIM[0]["conversation_id"])))),
        at_line("conversation_id"),
        {},
        "first on line 1",
    ),
    ("missing_policy_id", around(line(mutated(_del("policy_id")))), at_line("policy_id"), {}, "missing"),
    ("policy_id_not_string", around(line(mutated(_set("policy_id", 3)))), at_line("policy_id"), {}, "non-empty string"),
    (
        "unknown_policy_id",
        around(line(mutated(_set("policy_id", "pi_9")))),
        at_line("policy_id"),
        {"known_policy_ids": {"pi_0", "pi_1"}},
        "unknown policy id 'pi_9'; known: pi_0, pi_1",
    ),
    ("turns_not_a_list", around(line(mutated(_set("turns", "hello")))), at_line("turns"), {}, "list of turns"),
    (
        "turns_columnar_in_jsonl",
        around(line(mutated(_set("turns", {"customer": ["a"]})))),
        at_line("turns"),
        {},
        "got an object",
    ),
    ("empty_turns", around(line(mutated(_set("turns", [])))), at_line("turns"), {}, "must not be empty"),
    ("missing_turns", around(line(mutated(_del("turns")))), at_line("turns"), {}, "missing"),
    ("turn_not_an_object", around(line(mutated(_set("turns.1", "a laptop")))), at_line("turns[1]"), {}, "one turn"),
    ("missing_customer", around(line(mutated(_del("turns.0.customer")))), at_line("turns[0].customer"), {}, "missing"),
    (
        "customer_not_string",
        around(line(mutated(_set("turns.0.customer", 42)))),
        at_line("turns[0].customer"),
        {},
        "got 42",
    ),
    (
        "outcome_yes",
        around(line(mutated(_set("turns.2.outcome", "yes")))),
        at_line("turns[2].outcome"),
        {},
        "got 'yes'",
    ),
    ("outcome_half", around(line(mutated(_set("turns.2.outcome", 0.5)))), at_line("turns[2].outcome"), {}, "got 0.5"),
    ("outcome_null", around(line(mutated(_set("turns.2.outcome", None)))), at_line("turns[2].outcome"), {}, "got null"),
    (
        "outcome_two",
        around(line(mutated(_set("turns.2.outcome", 2)))),
        at_line("turns[2].outcome"),
        {},
        "expected 0 or 1",
    ),
    ("outcome_missing", around(line(mutated(_del("turns.2.outcome")))), at_line("turns[2].outcome"), {}, "missing"),
    (
        "outcome_before_last_turn",
        around(line(mutated(_set("turns.0.outcome", 1)))),
        at_line("turns[0].outcome"),
        {},
        "outcome 1 before the last turn",
    ),
    (
        "bad_business_action",
        around(line(mutated(_set("turns.0.business_action", "approve")))),
        at_line("turns[0].business_action"),
        {},
        "got 'approve'",
    ),
    (
        "none_on_agent_turn",
        around(line(mutated(_set("turns.0.business_action", "none")))),
        at_line("turns[0].business_action"),
        {},
        "terminal turn only",
    ),
    (
        "accept_with_edited_text",
        around(line(mutated(_set("turns.0.sent", "what do you need?")))),
        at_line("turns[0].sent"),
        {},
        "use 'edit'",
    ),
    (
        "abstain_with_accept",
        around(line(mutated(_set("turns.1.business_action", "accept")))),
        at_line("turns[1].business_action"),
        {},
        "must be 'reject'",
    ),
    ("missing_sent", around(line(mutated(_del("turns.0.sent")))), at_line("turns[0].sent"), {}, "missing"),
    ("empty_sent", around(line(mutated(_set("turns.1.sent", "")))), at_line("turns[1].sent"), {}, "must not be empty"),
    (
        "missing_suggestion_key",
        around(line(mutated(_del("turns.1.suggestion")))),
        at_line("turns[1].suggestion"),
        {},
        "abstained",
    ),
    (
        "suggestion_not_string",
        around(line(mutated(_set("turns.1.suggestion", 5)))),
        at_line("turns[1].suggestion"),
        {},
        "got 5",
    ),
    (
        "terminal_with_sent",
        around(line(mutated(_set("turns.2.sent", "thanks !")))),
        at_line("turns[2].sent"),
        {},
        "terminal",
    ),
    (
        "terminal_with_action",
        around(line(mutated(_set("turns.2.business_action", "accept")))),
        at_line("turns[2].business_action"),
        {},
        "terminal",
    ),
    ("lone_terminal_turn", around(line(mutated(_lone_terminal))), at_line("turns"), {}, "at least one agent turn"),
    (
        "bad_timestamp",
        around(line(mutated(_set("turns.1.timestamp", "yesterday")))),
        at_line("turns[1].timestamp"),
        {},
        "ISO 8601",
    ),
    (
        "numeric_timestamp",
        around(line(mutated(_set("turns.1.timestamp", 1700000000)))),
        at_line("turns[1].timestamp"),
        {},
        "ISO 8601",
    ),
    (
        "decreasing_timestamps",
        around(line(mutated(_set("turns.2.timestamp", "2026-11-02T09:00:00Z")))),
        at_line("turns[2].timestamp"),
        {},
        "must not decrease",
    ),
    (
        "mixed_time_zones",
        around(line(mutated(_set("turns.1.timestamp", "2026-11-02T10:16:00")))),
        at_line("turns[1].timestamp"),
        {},
        "time zone",
    ),
    (
        "unknown_field_typo",
        around(line(mutated(_set("outcomes", 1)))),
        at_line("outcomes"),
        {},
        "'outcome' is a field of each turn",
    ),
    (
        "unknown_field_close",
        around(line(mutated(_set("policy", "pi_0")))),
        at_line("policy"),
        {},
        "did you mean 'policy_id'",
    ),
    (
        "unknown_turn_field",
        around(line(mutated(_set("turns.0.role", "user")))),
        at_line("turns[0].role"),
        {},
        "chat-format",
    ),
    (
        "chat_format_record",
        around(line({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})),
        at_line("conversation_id", "policy_id", "turns", "messages"),
        {},
        "looks like chat-format messages",
    ),
    ("iteration_negative", around(line(mutated(_set("iteration", -1)))), at_line("iteration"), {}, "got -1"),
    ("iteration_string", around(line(mutated(_set("iteration", "3")))), at_line("iteration"), {}, "got '3'"),
    ("iteration_bool", around(line(mutated(_set("iteration", True)))), at_line("iteration"), {}, "got true"),
    ("metadata_list", around(line(mutated(_set("metadata", ["a"])))), at_line("metadata"), {}, "expected an object"),
    (
        "metadata_json_string_in_jsonl",
        around(line(mutated(_set("metadata", "{}")))),
        at_line("metadata"),
        {},
        "expected an object",
    ),
]


def _write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("lines, expected, kwargs, text", [c[1:] for c in JSONL_CASES], ids=[c[0] for c in JSONL_CASES])
def test_malformed_jsonl_is_reported_at_its_line_and_field(tmp_path, lines, expected, kwargs, text):
    path = tmp_path / "logs.jsonl"
    _write_lines(path, lines)
    report = validate_logs(path, **kwargs)

    assert {(p.location, p.field) for p in report.problems} == expected  # nothing on the valid lines
    assert report.total_problems == len(report.problems) and not report.ok
    for p in report.problems:
        prefix = f"{path}:{p.location}: {p.field}: " if p.field else f"{path}:{p.location}: "
        assert str(p).startswith(prefix)
    assert any(text in p.message for p in report.problems), [str(p) for p in report.problems]
    # The valid lines around the bad one are read all the same.
    assert [c.conversation_id for c in report.conversations] == [
        SIM[0]["conversation_id"],
        SIM[1]["conversation_id"],
        SIM[2]["conversation_id"],
    ]
    with pytest.raises(LogValidationError) as err:
        read_logs(path, **kwargs)
    assert f"{path}:line {BAD_LINE}" in str(err.value)


def test_the_schema_example_is_valid():
    problems, conv = check_record(base())
    assert problems == []
    assert conv.to_dict() == Conversation.from_dict(base()).to_dict()
    assert conv.turns[1].suggestion is None and conv.turns[1].business_action == "reject"
    assert conv.turns[-1].terminal and conv.turns[-1].business_action == "none"


def test_terminal_fields_may_be_absent_and_outcome_may_be_a_bool():
    record = base()
    record["turns"][-1] = {"customer": "ok i will buy it", "outcome": True}
    record["turns"][0]["outcome"] = False
    del record["iteration"], record["metadata"]
    problems, conv = check_record(record)
    assert problems == []
    assert conv.turns[-1] == Turn("ok i will buy it", outcome=1)
    assert conv.turns[0].outcome == 0 and type(conv.turns[0].outcome) is int
    assert conv.iteration == 0 and conv.metadata == {}


def test_truncated_last_line(tmp_path):
    path = tmp_path / "logs.jsonl"
    whole = line(SIM[2])
    _write_lines(path, [line(SIM[0]), line(SIM[1]), whole[: len(whole) // 2]])
    report = validate_logs(path)
    assert [(p.location, p.field) for p in report.problems] == [("line 3", "")]
    assert "truncated" in report.problems[0].message
    assert str(report.problems[0]).startswith(f"{path}:line 3: not valid JSON")
    assert len(report.conversations) == 2


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "logs.json"  # .json holding JSON lines reads the same
    _write_lines(path, [line(SIM[0]), b"\n", b"   \r\n", line(mutated(_set("turns.2.outcome", "yes"))), line(SIM[1])])
    report = validate_logs(path)
    assert [(p.location, p.field) for p in report.problems] == [("line 4", "turns[2].outcome")]
    assert report.format == "jsonl" and len(report.conversations) == 2


def test_mixed_schemas_in_one_file(tmp_path):
    path = tmp_path / "logs.jsonl"
    other = {"id": "s-1", "dialog": [{"speaker": "customer", "text": "hi"}]}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    _write_lines(path, [line(SIM[0]), line(other), line(SIM[1]), line(chat), line(SIM[2])])
    report = validate_logs(path)
    assert {p.location for p in report.problems} == {"line 2", "line 4"}
    assert {p.field for p in report.problems if p.location == "line 2"} == {  # "id" would be kept as metadata
        "dialog",
        "conversation_id",
        "policy_id",
        "turns",
    }
    assert any("chat-format" in p.message for p in report.problems if p.field == "dialog")
    assert len(report.conversations) == 3


def test_a_pretty_printed_document_gets_a_hint(tmp_path):
    path = tmp_path / "logs.json"
    path.write_text(json.dumps([base()], indent=2) + "\n")
    report = validate_logs(path)
    assert report.problems[0].location == "line 1"
    assert "one conversation per line" in report.problems[0].message


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank_lines_only"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "logs.jsonl"
    path.write_bytes(content)
    report = validate_logs(path)
    assert [(p.location, p.field) for p in report.problems] == [("", "")]
    assert str(report.problems[0]) == f"{path}: no conversations: the input holds no records"
    with pytest.raises(LogValidationError, match="no conversations"):
        read_logs(path)


@pytest.mark.parametrize(
    "name, text",
    [("missing.jsonl", "does not exist"), ("logs.csv", "unknown format '.csv'"), ("folder", "not a saved dataset")],
    ids=["missing_path", "unknown_extension", "plain_folder"],
)
def test_unusable_paths_raise_with_one_problem_naming_the_path(tmp_path, name, text):
    path = tmp_path / name
    if name == "logs.csv":
        path.write_text("conversation_id,turns\n")
    if name == "folder":
        path.mkdir()
        (path / "a.txt").write_text("x")
    with pytest.raises(LogValidationError) as err:
        validate_logs(path)
    assert len(err.value.problems) == 1 and err.value.total == 1
    assert err.value.problems[0].file == str(path) and err.value.path == str(path)
    assert text in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_problem_limit_keeps_the_first_and_counts_all(tmp_path):
    path = tmp_path / "logs.jsonl"
    bad = [line(mutated(_set("conversation_id", ""))) for _ in range(30)]
    _write_lines(path, [line(SIM[0])] + bad)
    report = validate_logs(path, max_problems=5)
    assert len(report.problems) == 5 and report.total_problems == 30
    assert [p.location for p in report.problems] == [f"line {i}" for i in range(2, 7)]
    with pytest.raises(LogValidationError) as err:
        read_logs(path, max_problems=5)
    message = str(err.value)
    assert message.startswith(f"invalid conversation logs in {path}: 30 problem(s)\n")
    assert message.endswith("\n  ... and 25 more")
    assert len(err.value.problems) == 5 and err.value.total == 30


def test_log_problem_str():
    assert str(
        LogProblem("logs.jsonl", "line 3", "turns[2].outcome", "expected 0 or 1 (int or true/false), got 'yes'")
    ) == ("logs.jsonl:line 3: turns[2].outcome: expected 0 or 1 (int or true/false), got 'yes'")
    assert str(LogProblem("logs.jsonl", "line 3", "", "not valid JSON")) == "logs.jsonl:line 3: not valid JSON"
    assert (
        str(LogProblem("logs.parquet", "", "", "not a readable Parquet file"))
        == "logs.parquet: not a readable Parquet file"
    )
    p = check_record(mutated(_set("turns.2.outcome", "yes")))[0]
    assert p == [("turns[2].outcome", "expected 0 or 1 (int or true/false), got 'yes'")]


# ---------------------------------------------------------------------- Parquet and HF folders
def _sim_conversations(n: int = 6) -> list[Conversation]:
    convs = make_conversations(n, seed0=3000)
    for k, conv in enumerate(convs):
        conv.policy_id = f"pi_{k % 2}"
        conv.iteration = k % 2
    return convs


def test_truncated_parquet_is_one_problem_naming_the_file(tmp_path):
    good = write_logs(_sim_conversations(), tmp_path / "good.parquet")
    data = good.read_bytes()
    path = tmp_path / "logs.parquet"
    path.write_bytes(data[: len(data) // 2])
    report = validate_logs(path)
    assert report.format == "parquet" and report.total_problems == 1
    (problem,) = report.problems
    assert (problem.file, problem.location, problem.field) == (str(path), "", "")
    assert str(problem).startswith(f"{path}: not a readable Parquet file: ")


def test_parquet_rows_missing_a_column(tmp_path):
    rows = [{k: v for k, v in c.to_dict().items() if k != "policy_id"} for c in _sim_conversations(3)]
    for row in rows:
        row["metadata"] = json.dumps(row["metadata"])
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = validate_logs(path)
    assert {(p.location, p.field) for p in report.problems} == {(f"row {i}", "policy_id") for i in (1, 2, 3)}
    assert all(str(p).startswith(f"{path}:row ") for p in report.problems)


def test_parquet_bad_rows_are_reported_by_row(tmp_path):
    rows = [c.to_dict() for c in _sim_conversations(4)]
    rows[1]["turns"][-1]["outcome"] = 2
    rows[3]["turns"][0]["business_action"] = "approve"
    for row in rows:
        row["metadata"] = json.dumps(row["metadata"])
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = validate_logs(path)
    last = len(rows[1]["turns"]) - 1
    assert {(p.location, p.field) for p in report.problems} == {
        ("row 2", f"turns[{last}].outcome"),
        ("row 4", "turns[0].business_action"),
    }
    assert len(report.conversations) == 2


def test_parquet_float_outcomes_are_problems_with_a_hint(tmp_path):
    row = base()
    for turn in row["turns"]:
        turn["outcome"] = float(turn["outcome"])
    row["metadata"] = json.dumps(row["metadata"])
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    report = validate_logs(path)
    assert {(p.location, p.field) for p in report.problems} == {("row 1", f"turns[{i}].outcome") for i in range(3)}
    assert "float" in report.problems[0].message


def test_parquet_columnar_turns_and_datetime_timestamps(tmp_path):
    """Columnar turns (as in buffers) read like lists of structs; datetimes become ISO strings."""
    import datetime as dt

    utc = dt.timezone.utc
    turns = base()["turns"]
    columnar = {
        key: [t.get(key) for t in turns] for key in ("customer", "outcome", "suggestion", "sent", "business_action")
    }
    columnar["timestamp"] = [dt.datetime(2026, 11, 2, 10, m, tzinfo=utc) for m in (15, 16, 17)]
    unequal = dict(columnar, outcome=[0, 1])
    rows = [
        {"conversation_id": "a", "policy_id": "pi_0", "turns": columnar},
        {"conversation_id": "b", "policy_id": "pi_0", "turns": unequal},
    ]
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = validate_logs(path)
    assert [(p.location, p.field) for p in report.problems] == [("row 2", "turns")]
    assert "unequal lengths" in report.problems[0].message
    (conv,) = report.conversations
    assert [t.timestamp for t in conv.turns] == [
        "2026-11-02T10:15:00+00:00",
        "2026-11-02T10:16:00+00:00",
        "2026-11-02T10:17:00+00:00",
    ]
    assert conv.turns[1].suggestion is None and conv.turns[-1].terminal


def test_parquet_metadata_string_must_be_a_json_object(tmp_path):
    rows = []
    for cid, meta in (("a", '{"source": "crm"}'), ("b", "[1, 2]"), ("c", "{not json")):
        row = base()
        row["conversation_id"], row["metadata"] = cid, meta
        rows.append(row)
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = validate_logs(path)
    assert {(p.location, p.field) for p in report.problems} == {("row 2", "metadata"), ("row 3", "metadata")}
    assert report.conversations[0].metadata == {"source": "crm"}


def test_hf_folder_bad_row(tmp_path):
    rows = [c.to_dict() for c in _sim_conversations(3)]
    rows[2]["turns"][0]["outcome"] = 1
    for row in rows:
        row["metadata"] = json.dumps(row["metadata"])
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    report = validate_logs(folder)
    assert report.format == "hf_dataset"
    assert [(p.location, p.field) for p in report.problems] == [("row 3", "turns[0].outcome")]
    assert str(report.problems[0]).startswith(f"{folder}:row 3: turns[0].outcome: ")


def test_dataset_dict_folder_asks_for_one_split(tmp_path):
    folder = tmp_path / "dd"
    rows = [c.to_dict() for c in _sim_conversations(2)]
    for row in rows:
        row["metadata"] = json.dumps(row["metadata"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    with pytest.raises(LogValidationError, match="pass one split's folder"):
        validate_logs(folder)


# ---------------------------------------------------------------------- round trips and writing
def _dicts(convs):
    return [c.to_dict() for c in convs]


def _with_edge_cases(convs: list[Conversation]) -> list[Conversation]:
    convs = copy.deepcopy(convs)
    convs.append(
        Conversation(
            "edge-ünïcode",
            [
                Turn(
                    "héllo — ok?",
                    suggestion=None,
                    sent="our own message",
                    business_action="reject",
                    timestamp="2026-11-02T10:15:00Z",
                ),
                Turn(
                    "hm", suggestion="", sent="edited 🙂", business_action="edit", timestamp="2026-11-02T11:16:00+01:00"
                ),
                Turn("bought", outcome=1, timestamp=None),
            ],
            iteration=3,
            policy_id="pi_3",
            metadata={"source": "crm", "nested": {"k": [1, 2]}},
        )
    )
    return convs


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip_is_exact(tmp_path, suffix):
    convs = _with_edge_cases(_sim_conversations())
    path = write_logs(convs, tmp_path / f"logs{suffix}")
    assert path == tmp_path / f"logs{suffix}"
    assert _dicts(read_logs(path)) == _dicts(convs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"logs{suffix}"]  # no temporary file left


def test_jsonl_is_one_to_dict_object_per_line(tmp_path):
    convs = _with_edge_cases(_sim_conversations(2))
    path = write_logs(convs, tmp_path / "logs.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == _dicts(convs)
    assert "ünïcode" in lines[-1]  # ensure_ascii=False


def test_buffers_validate_cleanly_and_read_like_load_buffer(tmp_path):
    convs = _with_edge_cases(_sim_conversations())
    folder = save_buffer(convs, tmp_path / "buffer")
    report = validate_logs(folder)
    assert report.ok and report.format == "hf_dataset"
    assert _dicts(read_logs(folder)) == _dicts(load_buffer(folder)) == _dicts(convs)


def test_write_logs_refuses_existing_paths_unknown_extensions_and_invalid_conversations(tmp_path):
    convs = _sim_conversations(2)
    existing = tmp_path / "logs.jsonl"
    existing.write_text("keep me")
    with pytest.raises(FileExistsError):
        write_logs(convs, existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(ValueError, match="jsonl, .jsonl.gz or .parquet"):
        write_logs(convs, tmp_path / "logs.csv")
    unnamed = make_conversations(1)  # the simulator leaves policy_id empty: would not read back
    with pytest.raises(LogValidationError, match="policy_id"):
        write_logs(unnamed, tmp_path / "bad.jsonl")
    with pytest.raises(LogValidationError, match="duplicate conversation_id"):
        write_logs(convs + convs[:1], tmp_path / "dup.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.jsonl"]


def test_fingerprint(tmp_path):
    convs = _sim_conversations(3)
    file = write_logs(convs, tmp_path / "logs.jsonl")
    assert logs_fingerprint(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    folder = save_buffer(convs, tmp_path / "buffer")
    first = logs_fingerprint(folder)
    assert first == logs_fingerprint(folder) and len(first) == 64
    (folder / "extra.txt").write_text("x")
    assert logs_fingerprint(folder) != first
    with pytest.raises(FileNotFoundError):
        logs_fingerprint(tmp_path / "missing")


# ---------------------------------------------------------------------- summary
def test_summarize_logs_hand_computed():
    success = Conversation(
        "s",
        [
            Turn(
                "hi",
                suggestion="what do you need ?",
                sent="what do you need ?",
                business_action="accept",
                timestamp="2026-11-02T10:00:00Z",
            ),
            Turn(
                "a laptop",
                suggestion="the mid laptop ?",
                sent="the mid laptop , sir ?",
                business_action="edit",
                timestamp="2026-11-02T10:05:00Z",
            ),
            Turn(
                "too pricey",
                suggestion=None,
                sent="there is a discount",
                business_action="reject",
                timestamp="2026-11-02T10:10:00Z",
            ),
            Turn("ok i will buy it", outcome=1, timestamp="2026-11-02T10:12:00Z"),
        ],
        policy_id="pi_0",
    )
    failure = Conversation(
        "f",
        [
            Turn("hello", suggestion="buy now !", sent="how can i help ?", business_action="reject"),
            Turn("bye", outcome=0),
        ],
        policy_id="pi_1",
    )
    assert summarize_logs([success, failure]) == {
        "conversations": 2,
        "turns": 6,
        "agent_turns": 4,
        "mean_agent_turns": 2.0,
        "outcome_rate": 0.5,
        "accept_rate": 0.25,
        "edit_rate": 0.25,
        "reject_rate": 0.5,
        "abstain_rate": 0.25,
        "policy_ids": {"pi_0": 1, "pi_1": 1},
        "first_timestamp": "2026-11-02T10:00:00Z",
        "last_timestamp": "2026-11-02T10:12:00Z",
    }
    empty = summarize_logs([])
    assert empty["conversations"] == 0 and empty["outcome_rate"] == 0.0 and empty["first_timestamp"] is None


def test_parquet_pandas_index_column_is_not_a_field(tmp_path):
    """pandas writes a non-default index as `__index_level_0__`: an artefact of the writer, not data."""
    row = base()
    row["metadata"] = json.dumps(row["metadata"])
    row["__index_level_0__"] = 7
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    assert validate_logs(path).ok
    jsonl = tmp_path / "logs.jsonl"
    jsonl.write_bytes(line(dict(base(), __index_level_0__=7)))
    report = validate_logs(jsonl)  # in JSON lines it is a field like any other: kept as metadata
    assert report.ok and report.conversations[0].metadata["__index_level_0__"] == 7
    assert report.extra_fields == ["__index_level_0__"]


def test_duplicate_ids_are_found_even_on_records_with_other_problems(tmp_path):
    path = tmp_path / "logs.jsonl"
    first = mutated(_set("turns.2.outcome", "yes"))  # invalid, but its id still counts
    second = mutated(_set("policy_id", ""))
    _write_lines(path, [line(first), line(SIM[0]), line(second)])
    report = validate_logs(path)
    assert {(p.location, p.field) for p in report.problems} == {
        ("line 1", "turns[2].outcome"),
        ("line 3", "policy_id"),
        ("line 3", "conversation_id"),
    }
    assert "duplicate conversation_id 'c-x' (first on line 1)" in str(report.problems[-1])


def test_a_record_cut_short_mid_file_gets_a_hint(tmp_path):
    path = tmp_path / "logs.jsonl"
    whole = line(SIM[1])
    _write_lines(path, [line(SIM[0]), whole[: len(whole) // 2].rstrip() + b"\n", line(SIM[2])])
    (problem,) = validate_logs(path).problems
    assert problem.location == "line 2" and "the line ends before the record does" in problem.message
