"""`iterppo validate-data`: summary and exit 0 for valid logs, problems on stderr and exit 1 otherwise;
writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_conversations

from iterppo_lightning.commands.validate_data import main
from iterppo_lightning.data.buffer import save_buffer
from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.data.log_io import write_logs


def _convs(n: int = 4) -> list[Conversation]:
    convs = make_conversations(n, seed0=4000)
    for k, conv in enumerate(convs):
        conv.policy_id = f"pi_{k % 2}"
    convs.append(
        Conversation(
            "stamped",
            [
                Turn("hi", suggestion=None, sent="hello !", business_action="reject", timestamp="2026-11-02T10:15:00Z"),
                Turn("bought", outcome=1, timestamp="2026-11-02T10:20:00Z"),
            ],
            policy_id="pi_0",
        )
    )
    return convs


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture()
def valid_jsonl(tmp_path):
    return write_logs(_convs(), tmp_path / "logs.jsonl")


@pytest.fixture()
def invalid_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(c.to_dict()) for c in _convs(3)]
    lines[1] = lines[1].replace('"outcome": 0', '"outcome": "yes"', 1)
    lines.append('{"messages": [{"role": "user", "content": "hi"}]}')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_valid_logs_print_a_summary_and_exit_0(valid_jsonl, capsys):
    before = _listing(valid_jsonl.parent)
    assert main([str(valid_jsonl)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"valid conversation logs: {valid_jsonl} (jsonl)" in out
    for text in (
        "conversations      5",
        "agent turns",
        "outcome rate",
        "accept",
        "edit",
        "reject",
        "abstained",
        "pi_0 (3), pi_1 (2)",
    ):
        assert text in out
    assert "2026-11-02T10:15:00Z .. 2026-11-02T10:20:00Z" in out
    assert _listing(valid_jsonl.parent) == before


def test_json_output_parses(valid_jsonl, capsys):
    assert main([str(valid_jsonl), "--json", "--known_policy_ids", "pi_0", "pi_1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["format"] == "jsonl" and result["path"] == str(valid_jsonl)
    assert result["conversations"] == 5 and result["policy_ids"] == {"pi_0": 3, "pi_1": 2}
    assert result["first_timestamp"] == "2026-11-02T10:15:00Z"


def test_invalid_logs_print_problems_to_stderr_and_exit_1(invalid_jsonl, capsys):
    before = _listing(invalid_jsonl.parent)
    assert main([str(invalid_jsonl)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0] == f"{invalid_jsonl}:line 2: turns[0].outcome: expected 0 or 1 (int or true/false), got 'yes'"
    assert all(x.startswith(f"{invalid_jsonl}:line 5: ") for x in lines[1:-1])
    assert any("chat-format" in x and "docs/data.md" in x for x in lines)
    assert lines[-1] == f"5 problem(s) in {invalid_jsonl}; nothing was written"
    assert _listing(invalid_jsonl.parent) == before


def test_problem_limit_and_json_for_invalid_logs(invalid_jsonl, capsys):
    assert main([str(invalid_jsonl), "--max_problems", "2", "--json"]) == 1
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["ok"] is False and result["total_problems"] == 5 and len(result["problems"]) == 2
    assert result["problems"][0] == {
        "file": str(invalid_jsonl),
        "location": "line 2",
        "field": "turns[0].outcome",
        "message": "expected 0 or 1 (int or true/false), got 'yes'",
    }
    assert "... and 3 more" in err and err.strip().endswith("nothing was written")


def test_unknown_policy_id_is_invalid(valid_jsonl, capsys):
    assert main([str(valid_jsonl), "--known_policy_ids", "pi_0"]) == 1
    assert "unknown policy id 'pi_1'; known: pi_0" in capsys.readouterr().err


def test_buffer_folder_is_valid_and_untouched(tmp_path, capsys):
    folder = save_buffer(_convs(), tmp_path / "buffer")
    before = _listing(tmp_path)
    assert main([str(folder)]) == 0
    assert "(hf_dataset)" in capsys.readouterr().out
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("name", ["missing.jsonl", "logs.csv"])
def test_unusable_path_exits_1(tmp_path, capsys, name):
    if name.endswith(".csv"):
        (tmp_path / name).write_text("a,b\n")
    assert main([str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / name) in err and err.strip().endswith("nothing was written")


@pytest.mark.parametrize(
    "argv", [[], ["x.jsonl", "--max_problems", "many"], ["x.jsonl", "--max_problems", "-1"], ["x.jsonl", "--nope"]]
)
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2


def test_module_entry_point(invalid_jsonl, valid_jsonl):
    run = [sys.executable, "-m", "iterppo_lightning.commands.validate_data"]
    bad = subprocess.run(run + [str(invalid_jsonl)], capture_output=True, text=True)
    assert bad.returncode == 1 and "nothing was written" in bad.stderr
    good = subprocess.run(run + [str(valid_jsonl), "--json"], capture_output=True, text=True)
    assert good.returncode == 0 and json.loads(good.stdout)["ok"] is True
