"""`iterppo sample` prints a trained policy's dialogues; evaluate, collect and sample take their config from a run,
and validate-data --run_dir the run's message limit and tokenizer.

One smoke fit per module (a real `iterppo fit` subprocess); every command then runs as a user would type it.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from cli_helpers import SMOKE, last_json_line, run_cli, run_inprocess
from conftest import make_conversations

from iterppo_lightning.commands.run_config import FIT_ONLY_KEYS, RunConfigError, find_run_dir, with_run_config
from iterppo_lightning.commands.sample import format_dialogue
from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.data.log_io import read_logs, write_logs

DIALOGUE_HEADER = re.compile(r"^dialogue (\d+) of (\d+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("sample") / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run), "--model.loop.iterations", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def sample(*args: str) -> str:
    proc = run_cli("sample", *args, env={"COLUMNS": "200"})  # a wide terminal: one line per message
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# -- sample ---------------------------------------------------------------------------------------


def test_sample_prints_numbered_dialogues_with_speakers_persona_and_outcome(run_dir):
    out = sample("--policy", str(run_dir / "final_policy"), "-n", "3", "--greedy")
    assert out.startswith(f"policy pi_1 ({run_dir / 'final_policy'}), 3 dialogue(s)")
    assert [m.groups() for m in DIALOGUE_HEADER.finditer(out)] == [("1", "3"), ("2", "3"), ("3", "3")]
    blocks = DIALOGUE_HEADER.split(out)[1:]
    for block in blocks[2::3]:
        lines = block.strip("\n-").splitlines()
        assert lines[0].startswith("persona (hidden from the agent): need ")
        assert re.match(r"^  1  customer  \S", lines[1]), lines[1]
        assert re.match(r"^     agent     ", lines[2]), lines[2]
        numbers = [int(m.group(1)) for line in lines if (m := re.match(r"^ +(\d+)  customer", line))]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 2
        outcomes = [line for line in lines if re.match(r"^outcome: (SUCCESS|no success) ", line)]
        assert len(outcomes) == 1 and lines.index(outcomes[0]) > numbers[-1], block
    assert re.search(r"^\d of 3 dialogue\(s\) ended in success$", out, re.MULTILINE)


def test_greedy_dialogues_are_evaluates_customers_and_repeat(run_dir):
    policy = str(run_dir / "final_policy")
    first = sample("--policy", policy, "-n", "4", "--greedy", "--seed", "3")
    assert sample("--policy", policy, "--dialogues", "4", "--greedy", "true", "--seed", "3") == first
    proc = run_cli("evaluate", "--policy", policy, "--episodes", "4", "--greedy", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    successes = int(re.search(r"^(\d) of 4 dialogue\(s\) ended in success$", first, re.MULTILINE).group(1))
    assert successes == round(result["success_rate"] * 4)
    customer_turns = len(re.findall(r"^ +\d+  customer", first, re.MULTILINE))
    assert customer_turns - 4 == pytest.approx(result["mean_turns"] * 4), "agent turns = customer turns - 1 each"


def test_a_sampled_dialogue_does_not_depend_on_how_many_are_asked_for(run_dir):
    policy = str(run_dir / "final_policy")

    def dialogues(n: int) -> list[str]:  # each dialogue's text, without the header and the closing count
        blocks = DIALOGUE_HEADER.split(sample("--policy", policy, "-n", str(n), "--seed", "4"))[3::3]
        return [block.split("\n---")[0] for block in blocks]

    one, three = dialogues(1), dialogues(3)
    assert three[0] == one[0] and three[1] != one[0]  # dialogue 1 alike; dialogue 2 is another customer
    assert sample("--policy", policy, "-n", "1", "--seed", "5") != sample("--policy", policy, "-n", "1", "--seed", "4")


def test_sample_with_run_dir_uses_its_final_policy_and_any_policy_of_the_run(run_dir):
    out = sample("--run_dir", str(run_dir), "-n", "1", "--seed", "5")
    assert out.startswith(f"policy pi_1 ({run_dir / 'final_policy'}), 1 dialogue(s)")
    pi0 = sample("--policy", str(run_dir / "pi_0" / "policy"), "-n", "1", "--seed", "5")
    assert pi0.startswith("policy pi_0 ")


def test_sample_refuses_bad_arguments_naming_them(run_dir, tmp_path, capsys):
    bad = run_inprocess(capsys, "sample", "--policy", str(run_dir / "final_policy"), "-n", "0")
    assert bad.returncode == 2 and "-n/--dialogues must be >= 1, got 0" in bad.stderr
    none = run_inprocess(capsys, "sample", "--config", str(SMOKE))
    assert none.returncode == 2 and "sample needs --policy DIR" in none.stderr
    not_run = run_inprocess(capsys, "sample", "--run_dir", str(tmp_path))
    assert not_run.returncode == 2 and f"--run_dir {str(tmp_path)!r} holds no run" in not_run.stderr


def test_a_temperature_changes_the_replies_and_is_named_and_checked(run_dir, tmp_path, capsys):
    """--temperature reaches evaluate, sample and collect, is reported, and is refused when it means nothing."""
    policy = str(run_dir / "final_policy")
    hot = sample("--policy", policy, "-n", "3", "--seed", "6", "--temperature", "3.0")
    assert hot.startswith(f"policy pi_1 ({policy}), 3 dialogue(s)") and "sampled replies at temperature 3" in hot
    assert hot != sample("--policy", policy, "-n", "3", "--seed", "6")
    proc = run_cli("evaluate", "--policy", policy, "--episodes", "3", "--temperature", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json_line(proc.stdout)["temperature"] == 0.5
    output = tmp_path / "logs.jsonl"
    proc = run_cli("collect", "--policy", policy, "--episodes", "2", "--temperature", "0.5", "--output", str(output))
    assert proc.returncode == 0 and len(read_logs(output)) == 2, proc.stderr[-3000:]
    for command, extra in (("evaluate", []), ("sample", []), ("collect", ["--output", str(tmp_path / "x.jsonl")])):
        zero = run_inprocess(capsys, command, "--policy", policy, "--temperature", "0", *extra)
        assert zero.returncode == 2 and "--temperature must be > 0, got 0.0" in zero.stderr, command
        both = run_inprocess(capsys, command, "--policy", policy, "--temperature", "0.5", "--greedy", *extra)
        assert both.returncode == 2 and "give --greedy or --temperature 0.5, not both" in both.stderr, command
    scripted = run_inprocess(
        capsys, "collect", "--run_dir", str(run_dir), "--temperature", "0.5", "--output", str(output)
    )
    assert scripted.returncode == 2 and "--temperature 0.5 needs --policy" in scripted.stderr


# -- evaluate and collect with a run's config ------------------------------------------------------------


def test_evaluate_takes_the_config_from_run_dir_the_policy_or_the_saved_config(run_dir):
    policy = str(run_dir / "final_policy")
    common = ["--episodes", "6", "--seed", "2"]
    explicit = run_cli("evaluate", "--config", str(SMOKE), "--policy", policy, *common)
    assert explicit.returncode == 0, explicit.stderr[-3000:]
    expected = last_json_line(explicit.stdout)
    for args in (
        ["--run_dir", str(run_dir)],  # the run's config.yaml and its final_policy
        ["--policy", policy],  # the policy's run is found
        ["--config", str(run_dir / "config.yaml"), "--policy", policy],  # the saved config as it is
    ):
        proc = run_cli("evaluate", *args, *common)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
        assert last_json_line(proc.stdout) == expected, args


def test_collect_with_run_dir_writes_logs_with_the_runs_settings(run_dir, tmp_path):
    output = tmp_path / "logs.jsonl.gz"
    proc = run_cli("collect", "--run_dir", str(run_dir), "--episodes", "3", "--output", str(output))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json_line(proc.stdout)["policy_id"] == "behaviour"  # no --policy: the scripted agents
    assert len(read_logs(output)) == 3


def test_validate_data_with_run_dir_uses_the_runs_message_limit_and_tokenizer(run_dir, tmp_path):
    conversations = make_conversations(6, seed0=7000)
    for conv in conversations:
        conv.policy_id = "pi_1"
        for turn in conv.turns:
            turn.customer = turn.customer.capitalize() + " 🙂"  # as a business might log it
    logs = write_logs(conversations, tmp_path / "logs.jsonl")
    proc = run_cli("validate-data", str(logs), "--run_dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unknown token '<unk>', e.g." in proc.stderr  # pi_1's word-level tokenizer
    copy = tmp_path / "run_copy"
    shutil.copytree(run_dir, copy, symlinks=True)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["max_message_chars"] = 30
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    limited = run_cli("validate-data", str(logs), "--run_dir", str(copy))
    assert limited.returncode == 1 and "over the limit of 30 (data.max_message_chars" in limited.stderr


# -- the command line rewriting, without running anything ---------------------------------------------------


def _config_of(argv: list[str]) -> dict:
    return yaml.safe_load(argv[argv.index("--config") + 1])


def test_with_run_config_puts_the_runs_config_first_without_fit_only_keys(run_dir):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(FIT_ONLY_KEYS) <= set(saved), "a run's config.yaml records fit's own arguments"
    argv = with_run_config(["evaluate", "--run_dir", str(run_dir), "--seed", "1"])
    assert argv[:2] == ["evaluate", "--config"]
    config = _config_of(argv)
    assert not set(FIT_ONLY_KEYS) & set(config) and config["model"] == saved["model"]
    assert argv[3:] == ["--run_dir", str(run_dir), "--seed", "1", "--policy", str(run_dir / "final_policy")]
    saved_as_is = with_run_config(["collect", "-c", str(run_dir / "config.yaml"), "--output", "x.jsonl"])
    assert saved_as_is[1] == "--config" and not set(FIT_ONLY_KEYS) & set(_config_of(saved_as_is))
    found = with_run_config(["sample", "--policy", str(run_dir / "iteration_0" / "policy"), "-n", "2", "--greedy"])
    assert _config_of(found)["data"] == saved["data"] and found[-4:] == ["--dialogues", "2", "--greedy", "true"]
    assert find_run_dir(run_dir / "pi_0" / "policy") == run_dir


def test_with_run_config_leaves_other_commands_and_plain_configs_alone(tmp_path):
    argv = ["fit", "--config", str(SMOKE), "--run_dir", str(tmp_path), "-n", "3"]
    assert with_run_config(argv) == argv
    plain = ["evaluate", "--config", str(SMOKE), "--policy", str(tmp_path / "elsewhere"), "--seed", "-1"]
    assert with_run_config(plain) == plain
    with pytest.raises(RunConfigError, match="holds no run"):
        with_run_config(["collect", "--run_dir", str(tmp_path), "--output", "x.jsonl"])


# -- the text of one dialogue ----------------------------------------------------------------------------


def test_a_dialogue_shows_what_the_business_sent_when_it_differs_from_the_suggestion():
    conversation = Conversation(
        "c-1",
        [
            Turn("hi", suggestion="what do you need ?", sent="what do you need ?", business_action="accept"),
            Turn(
                "a phone", suggestion="the premium phone ?", sent="sure ! the premium phone ?", business_action="edit"
            ),
            Turn("too much", suggestion="bye", sent="we have a discount .", business_action="reject"),
            Turn("ok", suggestion=None, sent="one moment please .", business_action="reject"),
            Turn("great , i will take it .", outcome=1),
        ],
        metadata={"persona": {"need": "phone", "price_sensitive": True, "style": 0}},
    )
    text = format_dialogue(conversation, "dialogue 1 of 1", width=200)
    assert text.splitlines() == [
        "dialogue 1 of 1",
        "persona (hidden from the agent): need phone, price sensitive yes, style 0",
        "  1  customer  hi",
        "     agent     what do you need ?",
        "  2  customer  a phone",
        "     agent     the premium phone ?",
        "     business  sure ! the premium phone ?   [edited the suggestion]",
        "  3  customer  too much",
        "     agent     bye",
        "     business  we have a discount .   [rejected the suggestion]",
        "  4  customer  ok",
        "     agent     (abstains)",
        "     business  one moment please .   [wrote its own reply]",
        "  5  customer  great , i will take it .",
        "outcome: SUCCESS (outcome 1 with the customer's message at turn 5)",
    ]
    narrow = format_dialogue(conversation, "d", width=40)
    assert all(len(line) <= 40 for line in narrow.splitlines())
    assert json.dumps(conversation.to_dict())  # unchanged and still plain data
