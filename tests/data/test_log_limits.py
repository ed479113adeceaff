"""Data limits and tolerances of conversation logs: the longest message, a business's extra columns, gzip-compressed
JSON lines, text the tokenizer cannot represent, and a batch without a success."""

from __future__ import annotations

import copy
import datetime as dt
import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import SMOKE, run_cli, run_inprocess
from conftest import make_conversations

from iterppo_lightning.commands.validate_data import main as validate_data
from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.datamodule import TrajectoryDataModule
from iterppo_lightning.data.log_io import read_logs, validate_logs, write_logs
from iterppo_lightning.data.log_schema import DEFAULT_MAX_MESSAGE_CHARS, check_record
from iterppo_lightning.data.vocabulary import count_unknown_tokens, unknown_token_warning


def records(n: int = 4, seed0: int = 5000) -> list[dict]:
    """Valid log records of simulated conversations, at least one of them a success."""
    convs = make_conversations(n, seed0=seed0)
    assert any(c.success for c in convs), "pick seeds with a success"
    for conv in convs:
        conv.policy_id = "pi_0"
    return [conv.to_dict() for conv in convs]


def write_jsonl(path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")


def as_table_rows(rows: list[dict]) -> list[dict]:
    """Rows as a table stores them: metadata as JSON text (one type per column)."""
    out = copy.deepcopy(rows)
    for row in out:
        row["metadata"] = json.dumps(row["metadata"])
    return out


# -- the longest message ----------------------------------------------------------------------------


def test_a_message_over_the_limit_is_a_problem_naming_line_and_field_all_at_once(tmp_path):
    rows = records()
    rows[1]["turns"][0]["customer"] = "x" * 501
    rows[3]["turns"][1]["sent"] = "y" * 600
    rows[3]["turns"][1]["suggestion"] = "y" * 600
    rows[3]["turns"][1]["business_action"] = "accept"
    path = tmp_path / "logs.jsonl"
    write_jsonl(path, rows)
    report = validate_logs(path, max_message_chars=500)
    found = [(p.location, p.field) for p in report.problems]
    assert found == [
        ("line 2", "turns[0].customer"),
        ("line 4", "turns[1].suggestion"),
        ("line 4", "turns[1].sent"),
    ]
    assert "501 characters, over the limit of 500 (data.max_message_chars" in report.problems[0].message
    assert validate_logs(path).ok, f"the default limit is {DEFAULT_MAX_MESSAGE_CHARS:,} characters"
    assert validate_logs(path, max_message_chars=None).ok
    huge = copy.deepcopy(rows[0])
    huge["turns"][0]["customer"] = "z" * (DEFAULT_MAX_MESSAGE_CHARS + 1)
    problems, conversation = check_record(huge)
    assert conversation is None and [field for field, _ in problems] == ["turns[0].customer"]


def test_validate_data_enforces_the_limit_and_takes_it_as_an_option(tmp_path, capsys):
    rows = records()
    rows[2]["turns"][0]["customer"] = "a " * 200
    path = tmp_path / "logs.jsonl"
    write_jsonl(path, rows)
    assert validate_data([str(path)]) == 0
    capsys.readouterr()
    assert validate_data([str(path), "--max_message_chars", "100"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:line 3: turns[0].customer: a message of 400 characters, over the limit of 100" in err
    assert validate_data([str(path), "--max_message_chars", "0"]) == 2
    assert "--max_message_chars must be an int >= 1" in capsys.readouterr().err


def test_the_data_setting_is_checked_and_fit_refuses_a_long_message_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="data.max_message_chars must be an int >= 1"):
        TrajectoryDataModule(max_message_chars=0)
    assert TrajectoryDataModule().max_message_chars == DEFAULT_MAX_MESSAGE_CHARS
    rows = records()
    rows[0]["turns"][1]["customer"] = "b" * 80
    path = tmp_path / "logs.jsonl"
    write_jsonl(path, rows)
    run_dir = tmp_path / "run"
    args = ["fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--data.logs", str(path)]
    refused = run_inprocess(capsys, *args, "--data.max_message_chars", "50")
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert f"{path}:line 1: turns[1].customer: a message of 80 characters, over the limit of 50" in refused.stderr
    assert not run_dir.exists(), "refused before the run folder exists"


# -- extra columns ---------------------------------------------------------------------------------


def _with_columns(rows: list[dict]) -> list[dict]:
    out = copy.deepcopy(rows)
    for n, row in enumerate(out):
        row["shop_id"] = f"shop-{n % 2}"
        row["agent_name"] = "ana" if n % 2 else "bo"
    return out


def _check_kept(report, rows: list[dict]) -> None:
    assert report.ok, [str(p) for p in report.problems]
    assert report.extra_fields == ["agent_name", "shop_id"]
    for conv, row in zip(report.conversations, rows):
        assert conv.metadata["shop_id"] == row["shop_id"] and conv.metadata["agent_name"] == row["agent_name"]
    kept = [w for w in report.warnings if "extra field" in w]
    assert len(kept) == 1 and "agent_name, shop_id" in kept[0], "ONE warning naming the columns"


def test_extra_columns_are_kept_in_metadata_with_one_warning_in_every_format(tmp_path):
    rows = _with_columns(records())
    jsonl = tmp_path / "logs.jsonl"
    write_jsonl(jsonl, rows)
    _check_kept(validate_logs(jsonl), rows)

    parquet = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(as_table_rows(rows)), parquet)
    _check_kept(validate_logs(parquet), rows)

    folder = tmp_path / "hf"
    datasets.Dataset.from_list(as_table_rows(rows)).save_to_disk(str(folder))
    _check_kept(validate_logs(folder), rows)


def test_extra_columns_reach_metadata_as_json_and_typos_stay_problems(tmp_path):
    row = records()[0]
    stamped = dict(row, created_at=dt.datetime(2026, 11, 2, 10, 15), channel=None, rating=float("nan"))
    problems, conversation = check_record(stamped, tabular=True)
    assert not problems and conversation.metadata["created_at"] == "2026-11-02T10:15:00"
    assert conversation.metadata["channel"] is None and conversation.metadata["rating"] is None  # pandas' missing
    for typo, hint in (("outcomes", "'outcome' is a field of each turn"), ("policy", "did you mean 'policy_id'")):
        problems, conversation = check_record(dict(row, **{typo: 1}))
        assert conversation is None and problems == [(typo, problems[0][1])] and hint in problems[0][1]
    clash = dict(row, metadata={"shop_id": "a"}, shop_id="b")
    problems, _ = check_record(clash)
    assert [field for field, _ in problems] == ["shop_id"] and "already has 'shop_id'" in problems[0][1]
    same = dict(row, metadata={"shop_id": "a"}, shop_id="a")
    assert check_record(same)[1].metadata == {"shop_id": "a"}
    binary = dict(row, blob=b"\x00\x01")
    problems, _ = check_record(binary, tabular=True)
    assert [field for field, _ in problems] == ["blob"] and "store it as text or drop the column" in problems[0][1]


def test_validate_data_prints_the_kept_columns_once(tmp_path, capsys):
    rows = _with_columns(records())
    path = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(as_table_rows(rows)), path)
    assert validate_data([str(path)]) == 0
    out, err = capsys.readouterr()
    assert "valid conversation logs" in out
    assert err.count("warning:") == 1 and "kept 2 extra field(s)" in err and "agent_name, shop_id" in err
    assert validate_data([str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and len(result["warnings"]) == 1


# -- gzip ------------------------------------------------------------------------------------------


def test_gzip_compressed_json_lines_read_like_plain_ones(tmp_path, capsys):
    rows = records()
    plain, packed = tmp_path / "logs.jsonl", tmp_path / "logs.jsonl.gz"
    write_jsonl(plain, rows)
    write_jsonl(packed, rows)
    assert [c.to_dict() for c in read_logs(packed)] == [c.to_dict() for c in read_logs(plain)]
    rows[2]["turns"][0]["outcome"] = "yes"
    bad = tmp_path / "bad.jsonl.gz"
    write_jsonl(bad, rows)
    assert [(p.location, p.field) for p in validate_logs(bad).problems] == [("line 3", "turns[0].outcome")]
    assert validate_data([str(packed)]) == 0
    assert f"valid conversation logs: {packed} (jsonl)" in capsys.readouterr().out


def test_a_corrupt_or_cut_gzip_file_is_one_problem_after_the_lines_read(tmp_path):
    rows = records()
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) - 20])
    report = validate_logs(cut)
    assert not report.ok and report.problems[-1].location == ""
    assert "not a readable gzip file" in report.problems[-1].message
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text(json.dumps(rows[0]) + "\n")
    assert "not a readable gzip file (after line 0)" in validate_logs(not_gzip).problems[0].message


def test_write_logs_writes_gzip_that_reads_back_and_repeats_byte_for_byte(tmp_path):
    convs = [Conversation.from_dict(r) for r in records()]
    first = write_logs(convs, tmp_path / "a.jsonl.gz")
    second = write_logs(convs, tmp_path / "b.jsonl.gz")
    assert first.read_bytes() == second.read_bytes(), "no time stamp in the gzip header"
    assert [c.to_dict() for c in read_logs(first)] == [c.to_dict() for c in convs]


# -- what the tokenizer cannot represent, and a batch with no success ------------------------------------


def _shouting(rows: list[dict]) -> list[dict]:
    """The same conversations as a business might log them: capitalised, with emoji."""
    out = copy.deepcopy(rows)
    for row in out:
        for turn in row["turns"]:
            turn["customer"] = turn["customer"].capitalize() + " 🙂"
    return out


def test_unknown_tokens_are_counted_with_their_share_and_an_example(tokenizer):
    plain = [Conversation.from_dict(r) for r in records()]
    assert count_unknown_tokens(plain, tokenizer).share < 0.01  # a rare word or two the tokenizer never saw
    assert unknown_token_warning(plain, tokenizer, "logs.jsonl") is None
    shouting = [Conversation.from_dict(r) for r in _shouting(records())]
    found = count_unknown_tokens(shouting, tokenizer)
    turns = sum(len(c.turns) for c in shouting)
    assert found.unknown >= turns  # at least every emoji
    assert 0 < found.share < 1
    warning = unknown_token_warning(shouting, tokenizer, "logs.jsonl")
    assert warning.startswith(f"logs.jsonl: {100 * found.share:.2f}% of the tokens")
    assert f"e.g. {found.example!r}" in warning and found.example[0].isupper()


def test_a_batch_without_a_success_gets_a_warning(tmp_path, capsys):
    rows = [r for r in records(12) if r["turns"][-1]["outcome"] == 0]
    path = tmp_path / "logs.jsonl"
    write_jsonl(path, rows)
    report = validate_logs(path)
    assert report.ok and len(report.warnings) == 1
    assert f"none of the {len(rows)} conversations ends with outcome 1" in report.warnings[0]
    assert validate_data([str(path)]) == 0
    assert "critic has no success to learn from" in capsys.readouterr().err
    write_jsonl(path, records())
    assert validate_logs(path).warnings == []


def test_validate_data_with_a_tokenizer_warns_about_unknown_text(tmp_path, tokenizer, capsys):
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    path = tmp_path / "logs.jsonl"
    write_jsonl(path, _shouting(records()))
    assert validate_data([str(path), "--tokenizer", str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "unknown token '<unk>', e.g." in err
    assert validate_data([str(path), "--tokenizer", str(tmp_path / "none")]) == 2


def test_fit_on_gzip_logs_keeps_extra_columns_and_warns_once_about_unknown_text(tmp_path):
    """One real iteration on logs: .jsonl.gz accepted, extra columns in the buffer's metadata, both warnings
    printed once and recorded in the iteration's metrics."""
    rows = _with_columns(_shouting(records(24, seed0=6000)))
    path = tmp_path / "logs.jsonl.gz"
    write_jsonl(path, rows)
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--data.logs", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("unknown token '<unk>'") == 1 and output.count("kept 2 extra field(s)") == 1
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert any("unknown token" in w for w in record["warnings"])
    assert any("agent_name, shop_id" in w for w in record["warnings"])
    from iterppo_lightning.data.buffer import load_buffer

    buffer = load_buffer(run_dir / "iteration_0" / "buffer")
    assert {c.metadata["shop_id"] for c in buffer} == {"shop-0", "shop-1"}
