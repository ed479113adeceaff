"""Read, validate, summarise and write conversation logs in JSONL, Parquet or HF-folder form.

``validate_logs`` reads the whole input and reports every problem it finds
(keeping the first ``max_problems`` to show, counting all), so a user fixes
their export once rather than one error per run. ``read_logs`` is the strict
entry point for training: all records valid, or nothing. The schema and its
record-level checks are in ``log_schema``; the rules in words in docs/data.md.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iterppo_lightning.data.conversation import TURN_FIELD_TYPES, TURN_FIELDS, Conversation
from iterppo_lightning.data.log_schema import (
    DEFAULT_MAX_MESSAGE_CHARS,
    DOCS,
    LogProblem,
    check_record,
    kept_extra_fields,
    parse_timestamp,
)
from iterppo_lightning.utils.atomic_io import atomic_path

__all__ = [
    "LogValidationError",
    "LogReport",
    "validate_logs",
    "read_logs",
    "summarize_logs",
    "write_logs",
    "logs_fingerprint",
    "is_log_file_name",
    "WRITABLE_SUFFIXES",
]

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
WRITABLE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
"""What write_logs (and `iterppo collect --output`) writes, by the end of the file name."""
EXPECTED = (
    "expected a .jsonl or .json file (JSON lines, optionally gzip-compressed: .jsonl.gz), a .parquet file, "
    "or a folder written by datasets' save_to_disk (with dataset_info.json or state.json)"
)
_PARQUET_BATCH_ROWS = 1024


class LogValidationError(ValueError):
    """Logs that cannot be used as they are; ``problems`` holds the first ones, ``total`` counts all."""

    def __init__(self, path: str | os.PathLike[str], problems: list[LogProblem], total: int | None = None) -> None:
        self.path = str(path)
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        lines = [f"invalid conversation logs in {self.path}: {self.total} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        if self.total > len(self.problems):
            lines.append(f"  ... and {self.total - len(self.problems)} more")
        super().__init__("\n".join(lines))


@dataclass
class LogReport:
    """What ``validate_logs`` found: the valid conversations and the problems of the rest."""

    path: str
    format: str
    """``"jsonl"``, ``"parquet"`` or ``"hf_dataset"``."""
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[LogProblem] = field(default_factory=list)
    """The first ``max_problems`` problems, in file order."""
    total_problems: int = 0
    locations: dict[str, str] = field(default_factory=dict)
    """conversation_id -> where its record is ("line 3", "row 3"), for later checks to point at."""
    extra_fields: list[str] = field(default_factory=list)
    """Extra top-level fields (a business's own columns) kept under each conversation's metadata, sorted."""
    warnings: list[str] = field(default_factory=list)
    """What is worth knowing about valid logs (extra fields kept, no successes), one line each."""

    @property
    def ok(self) -> bool:
        return self.total_problems == 0


# ---------------------------------------------------------------------- formats
def _detect_format(path: Path) -> str:
    """The input's format from its path; anything unusable raises with one problem naming it."""

    def fail(message: str) -> LogValidationError:
        return LogValidationError(path, [LogProblem(str(path), "", "", message)])

    if not path.exists():
        raise fail(f"does not exist; {EXPECTED}")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf_dataset"
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise fail(
                f"is a DatasetDict folder (splits: {', '.join(splits) or 'none'}); "
                f"pass one split's folder, e.g. {path / (splits[0] if splits else 'train')}"
            )
        raise fail(f"is a folder but not a saved dataset; {EXPECTED}")
    suffix = _suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise fail(f"unknown format {suffix or '(no extension)'!r}; {EXPECTED}")


def _suffix(path: Path) -> str:
    """The format's part of a file name: `.jsonl`, or `.jsonl.gz` for a compressed one."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return path.suffix.lower()


def is_log_file_name(path: str | os.PathLike[str]) -> bool:
    """Whether write_logs writes a file of this name (.jsonl, .jsonl.gz or .parquet)."""
    return _suffix(Path(path)) in WRITABLE_SUFFIXES


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of two equal keys silently; in logs that hides
    # one of two conflicting values (two outcomes, two ids), so it is a problem.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(location, record, problem) per non-blank line; record is None when problem is set.

    Reads bytes and decodes each line itself, so one line of invalid UTF-8 is a
    problem of that line, not an exception that hides the rest of the file. A
    `.gz` file is read through gzip; a corrupt or cut stream is one problem
    after the lines read before it.
    """
    compressed = path.suffix.lower() == ".gz"
    number = 0
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                found = _jsonl_record(number, raw)
                if found is not None:
                    yield found
    except (OSError, EOFError, zlib.error) as err:
        what = "not a readable gzip file" if compressed else "could not be read"
        yield "", None, f"{what} (after line {number}): {err}"


def _jsonl_record(number: int, raw: bytes) -> tuple[str, Any, str | None] | None:
    """One physical line's (location, record, problem); None for a blank line."""
    location = f"line {number}"
    try:
        # utf-8-sig on the first line: editors on Windows start files with a BOM.
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return location, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
    if not text.strip():
        return None
    try:
        # rstrip: the newline is not part of the record, and an error "at line 2,
        # column 1" of a one-line record would point nowhere useful.
        record = json.loads(text.rstrip(), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        return location, None, f"duplicate key {err.args[0]!r} in one JSON object"
    except ValueError as err:
        return location, None, _json_error_message(err, text, raw)
    if not isinstance(record, dict):
        return location, None, f"expected a JSON object (one conversation per line), got {_json_kind(record)}"
    return location, record, None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return f"a string {value[:40]!r}"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return f"a number {value!r}"


def _json_error_message(err: ValueError, text: str, raw: bytes) -> str:
    message = f"not valid JSON: {getattr(err, 'msg', str(err))}: column {getattr(err, 'colno', '?')}"
    if text.strip() in ("[", "{", "]", "}"):
        message += "; this looks like a pretty-printed JSON document, but logs need one conversation per line"
    elif not raw.endswith(b"\n"):
        message += "; the last line has no newline, so the file may be truncated"
    elif getattr(err, "pos", None) == len(text.rstrip()) or str(err).startswith("Unterminated string"):
        message += "; the line ends before the record does (cut short, or a record spread over several lines?)"
    return message


def _parquet_records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(location, row, problem); an unreadable file is one file-level problem (location "")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        number = 0
        # Batches keep memory at one batch of Python objects, not the whole table twice.
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row, None
    except (pa.ArrowException, OSError) as err:
        yield "", None, f"not a readable Parquet file: {err}"


def _hf_records(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a broken folder; all mean the same here
        yield "", None, f"not a readable dataset folder: {type(err).__name__}: {err}"
        return
    if isinstance(ds, datasets.DatasetDict):
        yield "", None, f"is a DatasetDict (splits: {', '.join(ds)}); pass one split's folder"
        return
    for number, row in enumerate(ds, start=1):
        yield f"row {number}", row, None


_READERS = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf_dataset": _hf_records}


# ---------------------------------------------------------------------- validation
class _Collector:
    """Keeps the first ``limit`` problems and counts all of them."""

    def __init__(self, file: str, limit: int) -> None:
        self.file, self.limit = file, limit
        self.kept: list[LogProblem] = []
        self.total = 0

    def add(self, location: str, field_path: str, message: str) -> None:
        self.total += 1
        if len(self.kept) < self.limit:
            self.kept.append(LogProblem(self.file, location, field_path, message))


def validate_logs(
    path: str | os.PathLike[str],
    *,
    max_problems: int = 20,
    known_policy_ids: set[str] | None = None,
    max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS,
) -> LogReport:
    """Check every record of the logs at ``path``; the report holds the valid conversations.

    ``max_message_chars`` limits every customer message, suggestion and sent
    message (data.max_message_chars; None = no limit). Raises
    ``LogValidationError`` only when ``path`` is not a log input at all
    (missing, unknown extension, a folder that is not a dataset); everything
    wrong inside an input is a problem in the report. The report's warnings
    (valid logs only) name extra fields kept in metadata and a batch with no
    success.
    """
    if max_problems < 0:
        raise ValueError(f"max_problems must be >= 0, got {max_problems}")
    path = Path(path)
    fmt = _detect_format(path)
    known = set(known_policy_ids) if known_policy_ids is not None else None
    problems = _Collector(str(path), max_problems)
    conversations: list[Conversation] = []
    first_seen: dict[str, str] = {}
    extra_fields: set[str] = set()
    records = 0
    tabular = fmt != "jsonl"
    for location, record, problem in _READERS[fmt](path):
        if problem is not None:
            problems.add(location, "", problem)
            records += bool(location)
            continue
        records += 1
        found, conversation = check_record(
            record, known_policy_ids=known, tabular=tabular, max_message_chars=max_message_chars
        )
        if isinstance(record, dict):
            extra_fields.update(kept_extra_fields(record, tabular))
        for field_path, message in found:
            problems.add(location, field_path, message)
        # Ids are compared whatever else is wrong with a record: fixing its other
        # problems must not reveal a duplicate only on the next run.
        cid = record.get("conversation_id") if isinstance(record, dict) else None
        if isinstance(cid, str) and cid.strip():
            if cid in first_seen:
                problems.add(
                    location, "conversation_id", f"duplicate conversation_id {cid!r} (first on {first_seen[cid]})"
                )
                continue
            first_seen[cid] = location
        if conversation is not None:
            conversations.append(conversation)
    if records == 0 and problems.total == 0:
        problems.add("", "", "no conversations: the input holds no records")
    report = LogReport(str(path), fmt, conversations, problems.kept, problems.total, first_seen, sorted(extra_fields))
    report.warnings = _report_warnings(report) if report.ok else []
    return report


def _report_warnings(report: LogReport) -> list[str]:
    """One line per thing worth knowing about valid logs: extra fields kept, a batch without a success."""
    warnings = []
    if report.extra_fields:
        warnings.append(
            f"{report.path}: kept {len(report.extra_fields)} extra field(s) under each conversation's metadata: "
            f"{', '.join(report.extra_fields)} (not used for training; see {DOCS})"
        )
    n = len(report.conversations)
    if n and not any(c.turns[-1].outcome == 1 for c in report.conversations):
        warnings.append(
            f"{report.path}: none of the {n} conversations ends with outcome 1: the critic has no success to learn "
            "from (every return is 0), so training on this batch cannot improve the policy. Check how outcomes "
            "were exported."
        )
    return warnings


def read_logs(
    path: str | os.PathLike[str],
    *,
    max_problems: int = 20,
    known_policy_ids: set[str] | None = None,
    max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS,
) -> list[Conversation]:
    """All conversations at ``path``, or ``LogValidationError`` if any record has a problem.

    All-or-nothing on purpose: training on the valid part of a broken export
    would quietly skew the outcome rate the critic learns.
    """
    return read_logs_report(
        path, max_problems=max_problems, known_policy_ids=known_policy_ids, max_message_chars=max_message_chars
    ).conversations


def read_logs_report(
    path: str | os.PathLike[str],
    *,
    max_problems: int = 20,
    known_policy_ids: set[str] | None = None,
    max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS,
) -> LogReport:
    """Like ``read_logs``, but the whole report (format, where each conversation is, warnings) of valid logs."""
    report = validate_logs(
        path, max_problems=max_problems, known_policy_ids=known_policy_ids, max_message_chars=max_message_chars
    )
    if not report.ok:
        raise LogValidationError(report.path, report.problems, report.total_problems)
    if not report.conversations:  # validate_logs reports this already; kept as a guard
        raise LogValidationError(report.path, [LogProblem(report.path, "", "", "no conversations")], 1)
    return report


# ---------------------------------------------------------------------- summary
def _rate(count: int, total: int) -> float:
    return count / total if total else 0.0


def _time_key(stamp: dt.datetime) -> dt.datetime:
    # Across conversations naive and aware times may mix; naive ones are taken as
    # UTC so the span can still be ordered (per conversation they never mix).
    if stamp.tzinfo is None:
        return stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.astimezone(dt.timezone.utc)


def _time_span(conversations: Iterable[Conversation]) -> tuple[str | None, str | None]:
    stamps = []
    for conv in conversations:
        for turn in conv.turns:
            parsed = parse_timestamp(turn.timestamp) if turn.timestamp else None
            if parsed is not None:
                stamps.append((_time_key(parsed), turn.timestamp))
    if not stamps:
        return None, None
    return min(stamps)[1], max(stamps)[1]


def summarize_logs(conversations: list[Conversation]) -> dict:
    """Counts and rates that show at a glance whether an export looks like the business's data.

    Rates of business actions and abstains are shares of agent turns;
    ``outcome_rate`` is the share of conversations whose last turn has outcome 1.
    Timestamps keep the form they were written in.
    """
    n = len(conversations)
    agent = [t for c in conversations for t in c.turns[:-1]]
    actions = Counter(t.business_action for t in agent)
    first, last = _time_span(conversations)
    return {
        "conversations": n,
        "turns": sum(len(c.turns) for c in conversations),
        "agent_turns": len(agent),
        "mean_agent_turns": _rate(len(agent), n),
        "outcome_rate": _rate(sum(1 for c in conversations if c.turns and c.turns[-1].outcome == 1), n),
        "accept_rate": _rate(actions["accept"], len(agent)),
        "edit_rate": _rate(actions["edit"], len(agent)),
        "reject_rate": _rate(actions["reject"], len(agent)),
        "abstain_rate": _rate(sum(1 for t in agent if t.suggestion is None), len(agent)),
        "policy_ids": dict(sorted(Counter(c.policy_id for c in conversations).items())),
        "first_timestamp": first,
        "last_timestamp": last,
    }


# ---------------------------------------------------------------------- writing
def _parquet_schema():
    import pyarrow as pa

    column_types = {str: pa.string(), int: pa.int64()}  # a turn field's type -> its Parquet type
    turn = pa.struct([(key, column_types[TURN_FIELD_TYPES[key]]) for key in TURN_FIELDS])
    return pa.schema(
        [
            ("conversation_id", pa.string()),
            ("policy_id", pa.string()),
            ("iteration", pa.int64()),
            # One type per column, and metadata varies by source: stored as JSON text (as in buffers).
            ("metadata", pa.string()),
            ("turns", pa.list_(turn)),
        ]
    )


def _parquet_row(conv: Conversation) -> dict:
    row = conv.to_dict()
    row["metadata"] = json.dumps(conv.metadata, sort_keys=True, ensure_ascii=False)
    return row


def _check_before_writing(conversations: list[Conversation], path: Path) -> None:
    """Refuse to write logs that ``read_logs`` would reject: a written file always reads back."""
    problems = _Collector(str(path), 20)
    seen: set[str] = set()
    for i, conv in enumerate(conversations):
        location = f"conversations[{i}]"
        for field_path, message in check_record(conv.to_dict())[0]:
            problems.add(location, field_path, message)
        if conv.conversation_id in seen:
            problems.add(location, "conversation_id", f"duplicate conversation_id {conv.conversation_id!r}")
        seen.add(conv.conversation_id)
    if not conversations:
        problems.add("", "", "no conversations to write")
    if problems.total:
        raise LogValidationError(path, problems.kept, problems.total)


def write_logs(conversations: list[Conversation], path: str | os.PathLike[str]) -> Path:
    """Write conversations as ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` (by name), atomically; never overwrites.

    The conversations are checked first (``LogValidationError`` if any would
    not read back). JSONL holds one ``to_dict()`` object per line (gzip-compressed
    for ``.jsonl.gz``, with no time stamp in the header, so equal logs give equal
    bytes); Parquet has metadata as a JSON string and turns as a list of structs.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(
            f"write_logs writes .jsonl, .jsonl.gz or .parquet files, not {suffix or '(no extension)'!r}: {path}"
        )
    if path.exists():
        raise FileExistsError(f"{str(path)!r} already exists; logs are never overwritten")
    conversations = list(conversations)
    _check_before_writing(conversations, path)
    with atomic_path(path) as tmp:
        if suffix in (".jsonl", ".jsonl.gz"):
            lines = (json.dumps(conv.to_dict(), ensure_ascii=False) + "\n" for conv in conversations)
            with open(tmp, "wb") as raw:
                if suffix == ".jsonl":
                    raw.writelines(line.encode("utf-8") for line in lines)
                else:
                    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                        f.writelines(line.encode("utf-8") for line in lines)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([_parquet_row(c) for c in conversations], schema=_parquet_schema())
            pq.write_table(table, tmp)
    return path


# ---------------------------------------------------------------------- fingerprint
def _hash_file(h: Any, file: Path) -> None:
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def logs_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 hex of the input's bytes, to record exactly which logs a run trained on.

    For a folder: its files' relative paths and bytes, in sorted path order;
    each path and size is hashed before the bytes so that moving bytes from one
    file to the next changes the fingerprint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(h, path)
        return h.hexdigest()
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    for relative, file in files:
        h.update(relative.encode("utf-8") + b"\0")
        h.update(file.stat().st_size.to_bytes(8, "big"))
        _hash_file(h, file)
    return h.hexdigest()
