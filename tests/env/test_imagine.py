"""Imagined conversations: parsing LLM text into records, and the persona -> dialogue -> critique pipeline.

The pipeline tests replace the LLM with a stub that answers each prompt kind
with canned text, so the counts (calls, rejections, critique use) are exact.
The tiny random Llama checks the real generation path survives nonsense; the
slow test runs SmolLM2-135M to see what a real (small) model produces.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.data.log_schema import check_record
from iterppo_lightning.env import imagine
from iterppo_lightning.env.imagine import (
    REPORT_FILE,
    ImagineConfig,
    ImagineReport,
    imagine_conversations,
    imagine_dialogues,
    parse_dialogue,
    parse_personas,
    sample_outcomes,
    write_imagined_buffer,
)


def assert_valid(conv) -> None:
    problems, _ = check_record(conv.to_dict())
    assert problems == [], problems


def parse(text: str, outcome: int = 1, max_turns: int = 6):
    return parse_dialogue(text, outcome, "c-1", "a student", max_turns)


# ---------------------------------------------------------------------- parse_personas
def test_parse_personas_numbered_list_skips_preamble_and_bold():
    text = (
        "Here are four customers:\n"
        "1. **Anna**, a student who wants cheap headphones, budget $50, impatient.\n"
        "2) Bob: needs a work laptop, budget $1200, careful\n"
        "\n"
        "3. Carla - wants the newest phone, no budget limit, chatty\n"
        "These customers cover the range."
    )
    assert parse_personas(text, 8) == [
        "Anna, a student who wants cheap headphones, budget $50, impatient",
        "Bob: needs a work laptop, budget $1200, careful",
        "Carla - wants the newest phone, no budget limit, chatty",
    ]


def test_parse_personas_bullets_limit_and_duplicates():
    text = "- Dan wants a phone\n* Eve wants a laptop\n\u2022 Dan wants a phone\n+ Finn wants headphones"
    assert parse_personas(text, 8) == ["Dan wants a phone", "Eve wants a laptop", "Finn wants headphones"]
    assert parse_personas(text, 2) == ["Dan wants a phone", "Eve wants a laptop"]


def test_parse_personas_plain_lines_when_nothing_is_listed():
    text = "Customers:\nGina wants a tablet, $300, shy\n\nHal wants earbuds, $80, rude"
    assert parse_personas(text, 8) == ["Gina wants a tablet, $300, shy", "Hal wants earbuds, $80, rude"]
    assert parse_personas("", 8) == []


# ---------------------------------------------------------------------- parse_dialogue
def test_parse_dialogue_basic_turns_and_terminal_outcome():
    text = (
        "Customer: Hi, I need headphones.\n"
        "Agent: Sure, what is your budget?\n"
        "Customer: About $50.\n"
        "Agent: The Basic model is $45.\n"
        "Customer: Great, I'll take it."
    )
    conv = parse(text, outcome=1)
    assert [t.customer for t in conv.turns] == ["Hi, I need headphones.", "About $50.", "Great, I'll take it."]
    assert [t.sent for t in conv.turns] == ["Sure, what is your budget?", "The Basic model is $45.", None]
    assert all(t.suggestion == t.sent and t.business_action == "accept" for t in conv.turns[:-1])
    assert conv.rewards() == [0, 0, 1]
    assert conv.policy_id == "imagined" and conv.conversation_id == "c-1"
    assert conv.metadata == {"persona": "a student", "imagined": True, "sampled_outcome": 1}
    assert_valid(conv)


def test_parse_dialogue_failure_outcome_only_on_last_turn():
    text = "Customer: Do you have phones?\nAgent: Yes, the Pro is $999.\nCustomer: Too expensive, no thanks."
    conv = parse(text, outcome=0)
    assert conv.rewards() == [0, 0] and not conv.success
    assert conv.turns[-1].terminal
    assert_valid(conv)


def test_parse_dialogue_tolerates_tags_numbers_and_markdown():
    text = (
        "Here is the conversation:\n"
        "1. **Customer:** Hello there.\n"
        '2) **Agent**: "Hi! What can I do for you?"\n'
        "- user: A laptop please.\n"
        "ASSISTANT: We have the Air.\n"
        "(The customer smiles.)\n"
        "Customer (Anna): Sounds like a deal."
    )
    conv = parse(text, outcome=1)
    assert [t.customer for t in conv.turns] == ["Hello there.", "A laptop please.", "Sounds like a deal."]
    assert [t.sent for t in conv.turns[:-1]] == ["Hi! What can I do for you?", "We have the Air."]
    assert_valid(conv)


def test_parse_dialogue_bare_tag_takes_next_line():
    conv = parse("**Customer:**\nI want headphones.\n**Agent:**\nHere are two.\n**Customer:**\nI'll buy them.")
    assert [t.customer for t in conv.turns] == ["I want headphones.", "I'll buy them."]
    assert conv.turns[0].sent == "Here are two."


def test_parse_dialogue_ignores_other_speakers_and_stage_directions():
    text = (
        "Customer:\nNarrator: The shop is busy.\n"
        "Customer: (2019-05-02 10:13) I want a laptop.\n"
        "Receipt: #1234\n"
        "Agent: (smiling) The Air is on sale."
    )
    conv = parse(text, outcome=0)
    assert conv.turns[0].customer == "I want a laptop."
    assert conv.turns[0].sent == "The Air is on sale."


def test_parse_dialogue_merges_consecutive_lines_of_one_speaker():
    text = (
        "Customer: Hi.\nCustomer: I need a phone.\nAgent: Sure.\nAgent: Budget?\nCustomer: $300.\nAgent: Try the Mid."
    )
    conv = parse(text)
    assert conv.turns[0].customer == "Hi. I need a phone."
    assert conv.turns[0].sent == "Sure. Budget?"
    assert_valid(conv)


def test_parse_dialogue_drops_leading_agent_line():
    conv = parse("Agent: Welcome to the shop!\nCustomer: Hi, a laptop?\nAgent: The Air.\nCustomer: I'll take it.")
    assert [t.customer for t in conv.turns] == ["Hi, a laptop?", "I'll take it."]
    assert conv.turns[0].sent == "The Air."


def test_parse_dialogue_ending_on_agent_appends_neutral_terminal_turn():
    text = "Customer: Hi.\nAgent: Hello, what do you need?\nCustomer: Headphones.\nAgent: Here you go."
    success, failure = parse(text, outcome=1), parse(text, outcome=0)
    assert [t.customer for t in success.turns] == ["Hi.", "Headphones.", "thanks, i will buy it"]
    assert success.turns[1].sent == "Here you go."
    assert failure.turns[-1].customer == "no thanks, bye"
    assert success.rewards() == [0, 0, 1] and failure.rewards() == [0, 0, 0]
    assert_valid(success)
    assert_valid(failure)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Once upon a time a customer bought a laptop.",
        "Agent: Hello!\nAgent: Anyone there?",
        "Customer: Hello?\nCustomer: Anyone there?",
        "Agent: Hi.\nCustomer: Bye.",
        "Customer:\nAgent:   ",
        "Customer: a\nAgent: Cards!\nCustomer: b\nAgent: Cards!\nCustomer: c\nAgent: Cards!",  # a loop
    ],
)
def test_parse_dialogue_unusable_text_is_none(text):
    assert parse(text) is None


def test_parse_dialogue_rejects_an_ending_that_contradicts_the_outcome():
    bought = "Customer: A phone?\nAgent: The Mid.\nCustomer: Great, I'll buy it."
    left = "Customer: A phone?\nAgent: The Mid.\nCustomer: No thanks, I won't buy it."
    unclear = "Customer: A phone?\nAgent: The Mid.\nCustomer: Thank you."
    assert parse(bought, outcome=0) is None and parse(bought, outcome=1) is not None
    assert parse(left, outcome=1) is None and parse(left, outcome=0) is not None
    assert parse(unclear, outcome=0) is not None and parse(unclear, outcome=1) is not None


def test_parse_dialogue_max_turns_keeps_first_turns_and_the_ending():
    lines = []
    for i in range(5):
        lines += [f"Customer: question {i}", f"Agent: answer {i}"]
    conv = parse("\n".join(lines + ["Customer: I'll take it."]), max_turns=2)
    assert [t.customer for t in conv.turns] == ["question 0", "question 1", "I'll take it."]
    assert [t.sent for t in conv.turns] == ["answer 0", "answer 1", None]
    assert conv.rewards() == [0, 0, 1]
    assert_valid(conv)
    ends_on_agent = parse("\n".join(lines), outcome=0, max_turns=3)
    assert len(ends_on_agent.agent_turns) == 3 and ends_on_agent.turns[-1].customer == "no thanks, bye"


def test_parse_dialogue_checks_the_outcome_value():
    with pytest.raises(ValueError, match="outcome"):
        parse("Customer: a\nAgent: b", outcome=2)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"personas": 0}, "imagine.personas"),
        ({"dialogues_per_persona": 0}, "imagine.dialogues_per_persona"),
        ({"max_turns": 0}, "imagine.max_turns"),
        ({"batch_size": 0}, "imagine.batch_size"),
        ({"max_new_tokens": 0}, "imagine.max_new_tokens"),
        ({"success_prob": 1.5}, "imagine.success_prob"),
        ({"temperature": 0.0}, "imagine.temperature"),
        ({"task": "  "}, "imagine.task"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ImagineConfig(**kwargs)


# ---------------------------------------------------------------------- pipeline with a stub LLM
SUCCESS = (
    "Customer: Hi, I need headphones.\nAgent: What budget?\nCustomer: $50.\nAgent: The Basic.\nCustomer: I'll take it."
)
FAILURE = "Customer: Hi, a phone?\nAgent: The Pro, $999.\nCustomer: Too expensive, no thanks."


def _kind(messages) -> str:
    text = messages[-1]["content"]
    if text.startswith("List "):
        return "personas"
    if text.startswith("Write a realistic conversation"):
        return "dialogue"
    if text.startswith("Rewrite this conversation"):
        return "critique"
    raise AssertionError(f"unexpected prompt: {text[:60]!r}")


def _wants_success(prompt: str) -> bool:
    return "leaving without buying" not in prompt


class StubLLM:
    """Stands in for generate_chat: canned text per prompt kind; records every call."""

    def __init__(self, n_personas: int = 3, dialogue=None, critique=None):
        self.personas = "Customers:\n" + "\n".join(
            f"{i + 1}. Persona {i}, budget ${100 * (i + 1)}" for i in range(n_personas)
        )
        self.dialogue = dialogue or (lambda i, prompt: SUCCESS if _wants_success(prompt) else FAILURE)
        self.critique = critique or (
            lambda i, prompt: "Customer: Hello.\nAgent: What do you need?\n" + prompt.split("\n\n", 1)[1]
        )
        self.calls: list[tuple[str, int]] = []
        self.counts = {"dialogue": 0, "critique": 0}

    def __call__(self, model, tokenizer, conversations, *, max_new_tokens, temperature, batch_size, **_):
        kinds = {_kind(m) for m in conversations}
        assert len(kinds) == 1, "one generate call mixes prompt kinds"
        kind = kinds.pop()
        assert len(conversations) <= batch_size
        self.calls.append((kind, len(conversations)))
        if kind == "personas":
            return [self.personas]
        out = []
        for messages in conversations:
            fn = self.dialogue if kind == "dialogue" else self.critique
            out.append(fn(self.counts[kind], messages[-1]["content"]))
            self.counts[kind] += 1
        return out


def run_stub(monkeypatch, stub: StubLLM, **config) -> ImagineReport:
    monkeypatch.setattr(imagine, "generate_chat", stub)
    return imagine_conversations(None, None, ImagineConfig(**config))


def test_pipeline_batches_one_call_per_stage_per_batch(monkeypatch):
    stub = StubLLM(n_personas=3)
    report = run_stub(monkeypatch, stub, personas=3, dialogues_per_persona=3, batch_size=4)
    assert stub.calls == [
        ("personas", 1),
        ("dialogue", 4), ("dialogue", 4), ("dialogue", 1),
        ("critique", 4), ("critique", 4), ("critique", 1),
    ]  # fmt: skip
    assert report.personas == ["Persona 0, budget $100", "Persona 1, budget $200", "Persona 2, budget $300"]
    assert report.requested == 9 and report.parsed == 9 and report.rejected == {}
    assert report.critique_used == 9 and report.critique_kept_original == 0
    assert len(report.raw_dialogues) == len(report.raw_critiques) == 9 and report.raw_personas.startswith("Customers:")
    assert report.cut_off == 0
    ids = [c.conversation_id for c in report.conversations]
    assert len(set(ids)) == 9 and ids[0] == "imagined-s0-p0-d0"
    for conv in report.conversations:
        assert conv.turns[0].customer == "Hello."  # the rewrite replaced the original
        assert conv.metadata["critiqued"] is True
        assert conv.success == bool(conv.metadata["sampled_outcome"])
        assert_valid(conv)


def test_pipeline_without_critique_makes_no_critique_calls(monkeypatch):
    stub = StubLLM(n_personas=2)
    report = run_stub(monkeypatch, stub, personas=2, dialogues_per_persona=2, batch_size=8, critique=False)
    assert stub.calls == [("personas", 1), ("dialogue", 4)]
    assert report.critique_used == 0 and report.critique_kept_original == 0
    assert all(c.metadata["critiqued"] is False for c in report.conversations)


def test_pipeline_keeps_the_original_when_the_rewrite_does_not_parse(monkeypatch):
    def critique(i, prompt):
        if i % 3 == 0:
            return "I rewrote it but forgot the format."
        if i % 3 == 1:  # flips the ending: must not replace a correctly labelled original
            return "Customer: Hi.\nAgent: Hello.\n" + (
                "Customer: No thanks, bye." if "I'll take it" in prompt else "Customer: I'll buy it."
            )
        return "Customer: Rewritten.\nAgent: Fine.\n" + prompt.split("\n\n", 1)[1]

    stub = StubLLM(n_personas=2, critique=critique)
    report = run_stub(monkeypatch, stub, personas=2, dialogues_per_persona=3)
    assert report.parsed == 6
    assert report.critique_used == 2 and report.critique_kept_original == 4
    assert [c.metadata["critiqued"] for c in report.conversations] == [False, False, True, False, False, True]
    for conv in report.conversations:
        original_first = "Hi, I need headphones." if conv.metadata["sampled_outcome"] else "Hi, a phone?"
        assert conv.turns[0].customer == ("Rewritten." if conv.metadata["critiqued"] else original_first)
        assert conv.success == bool(conv.metadata["sampled_outcome"])


def test_pipeline_counts_rejections_by_reason(monkeypatch):
    def dialogue(i, prompt):
        wrong_ending = FAILURE if _wants_success(prompt) else SUCCESS
        return [
            SUCCESS if _wants_success(prompt) else FAILURE,
            "Sorry, I cannot write that.",
            "Agent: Hello!\nAgent: Hello?",
            "Customer: Hi?\nCustomer: Anyone?",
            wrong_ending,
        ][i % 5]

    stub = StubLLM(n_personas=2, dialogue=dialogue)
    report = run_stub(monkeypatch, stub, personas=2, dialogues_per_persona=5, batch_size=3)
    assert report.requested == 10 and report.parsed == 2
    assert report.rejected == {"no speaker lines": 2, "no customer line": 2, "no agent line": 2, "outcome mismatch": 2}
    assert report.requested == report.parsed + sum(report.rejected.values())
    assert stub.calls[-1] == ("critique", 2)  # only the dialogues that parsed are rewritten
    assert [c.conversation_id for c in report.conversations] == ["imagined-s0-p0-d0", "imagined-s0-p1-d0"]


def test_pipeline_uses_the_personas_it_got(monkeypatch):
    stub = StubLLM(n_personas=2)
    report = run_stub(monkeypatch, stub, personas=5, dialogues_per_persona=2)
    assert len(report.personas) == 2 and report.requested == 4
    assert {c.metadata["persona"] for c in report.conversations} == set(report.personas)


def test_pipeline_leaves_out_personas_that_echo_the_task(monkeypatch):
    stub = StubLLM()
    task = ImagineConfig().task
    stub.personas = (
        f"1. {task}\n2. A shop assistant helps a customer choose a laptop, phone, or headphones\n3. Ivy, wants a phone"
    )
    report = run_stub(monkeypatch, stub, personas=3, dialogues_per_persona=1)
    assert report.personas == ["Ivy, wants a phone"] and report.requested == 1
    stub.personas = task
    report = run_stub(monkeypatch, stub, personas=3, dialogues_per_persona=1)
    assert report.personas == [] and report.requested == 0 and report.conversations == []


def test_outcome_balance_follows_success_prob(monkeypatch):
    stub = StubLLM(n_personas=10)
    report = run_stub(
        monkeypatch, stub, personas=10, dialogues_per_persona=20, success_prob=0.25, critique=False, batch_size=64
    )
    outcomes = [c.metadata["sampled_outcome"] for c in report.conversations]
    assert report.parsed == 200
    assert outcomes == sample_outcomes(ImagineConfig(success_prob=0.25), 200)
    assert 0.15 < sum(outcomes) / 200 < 0.35
    assert [int(c.success) for c in report.conversations] == outcomes
    for prob, expected in ((0.0, 0), (1.0, 200)):
        assert sum(sample_outcomes(ImagineConfig(success_prob=prob), 200)) == expected


def test_pipeline_is_deterministic_for_a_seed(monkeypatch):
    def records(seed):
        report = run_stub(monkeypatch, StubLLM(n_personas=4), personas=4, dialogues_per_persona=4, seed=seed)
        return [c.to_dict() for c in report.conversations]

    assert records(3) == records(3)
    first, other = records(3), records(4)
    assert [r["metadata"]["sampled_outcome"] for r in first] != [r["metadata"]["sampled_outcome"] for r in other]
    assert first[0]["conversation_id"] != other[0]["conversation_id"]


class WordTokenizer:
    """Counts whitespace-separated words as tokens: enough for the cut-off check."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_a_dialogue_cut_off_at_max_new_tokens_loses_its_unfinished_line(monkeypatch):
    cut = "Customer: Hi, a phone?\nAgent: The Mid is $300.\nCustomer: Great, I will ta"
    monkeypatch.setattr(imagine, "generate_chat", StubLLM(n_personas=1, dialogue=lambda i, p: cut))
    config = ImagineConfig(personas=1, dialogues_per_persona=1, success_prob=1.0, max_new_tokens=15, critique=False)
    report = imagine_dialogues(None, WordTokenizer(), config, ["a student"])
    assert report.cut_off == 1 and report.raw_dialogues == [cut]
    (conv,) = report.conversations
    assert [t.customer for t in conv.turns] == ["Hi, a phone?", "thanks, i will buy it"]
    roomy = ImagineConfig(personas=1, dialogues_per_persona=1, success_prob=1.0, max_new_tokens=64, critique=False)
    report = imagine_dialogues(None, WordTokenizer(), roomy, ["a student"])
    assert report.cut_off == 0 and report.conversations[0].turns[-1].customer == "Great, I will ta"


# ---------------------------------------------------------------------- tiny random Llama
@pytest.fixture(scope="module")
def tiny_chat():
    from tiny_chat import build_tiny_llama, train_chat_tokenizer

    tokenizer = train_chat_tokenizer()
    return build_tiny_llama(tokenizer), tokenizer


def test_tiny_random_llama_runs_and_rejects_everything(tiny_chat, tmp_path):
    model, tokenizer = tiny_chat
    config = ImagineConfig(personas=2, dialogues_per_persona=2, max_new_tokens=24, batch_size=3)
    torch.manual_seed(0)
    report = imagine_conversations(model, tokenizer, config)
    assert report.parsed == 0 and report.conversations == []
    assert report.requested == sum(report.rejected.values()) == 2 * len(report.personas)
    # The dialogue stage on its own, with personas given (random text rarely yields a persona list).
    report = imagine_dialogues(model, tokenizer, config, ["a student", "a gamer"])
    assert report.requested == 4 and report.parsed == 0 and sum(report.rejected.values()) == 4
    assert len(report.raw_dialogues) == 4
    with pytest.raises(ValueError, match="no imagined conversation parsed"):
        write_imagined_buffer(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- output
def test_write_imagined_buffer_round_trips(monkeypatch, tmp_path):
    def dialogue(i, prompt):
        return "no dialogue here" if i == 1 else (SUCCESS if _wants_success(prompt) else FAILURE)

    report = run_stub(monkeypatch, StubLLM(n_personas=2, dialogue=dialogue), personas=2, dialogues_per_persona=2)
    buffer = write_imagined_buffer(report, tmp_path / "imagined")
    assert buffer == tmp_path / "imagined" / "buffer"
    loaded = load_buffer(buffer)
    assert [c.to_dict() for c in loaded] == [c.to_dict() for c in report.conversations]
    for conv in loaded:
        assert_valid(conv)
    saved = json.loads((tmp_path / "imagined" / REPORT_FILE).read_text())
    assert saved["requested"] == 4 and saved["parsed"] == 3 and saved["rejected"] == {"no speaker lines": 1}
    assert saved["parse_rate"] == 0.75 and saved["successes"] + saved["failures"] == 3
    assert saved["personas"] == report.personas and saved["config"]["personas"] == 2
    assert len(saved["raw_dialogues"]) == 4 and len(saved["raw_critiques"]) == 3
    with pytest.raises(FileExistsError):
        write_imagined_buffer(report, tmp_path / "imagined")


def test_an_imagined_folder_cut_short_leaves_nothing(monkeypatch, tmp_path):
    import iterppo_lightning.env.imagine as imagine

    report = run_stub(monkeypatch, StubLLM(n_personas=1, dialogue=lambda i, p: SUCCESS), personas=1)

    def interrupted(*args, **kwargs):  # the report's write is cut short (Ctrl-C, a full disk)
        raise KeyboardInterrupt

    monkeypatch.setattr(imagine, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_imagined_buffer(report, tmp_path / "imagined")
    assert list(tmp_path.iterdir()) == []  # no half folder, no temporary one: the same command can run again


# ---------------------------------------------------------------------- SmolLM2 (slow)
@pytest.mark.slow
def test_smollm2_imagines_conversations(tmp_path, smollm2_folder):
    """A real 135M chat model through the whole pipeline: it must run; the output quality is printed, not asserted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    config = ImagineConfig(personas=2, dialogues_per_persona=2, max_new_tokens=160)
    torch.manual_seed(0)
    start = time.perf_counter()
    report = imagine_conversations(model, tokenizer, config)
    print(f"\n--- SmolLM2 imagine run ({time.perf_counter() - start:.0f} s)")
    print("raw personas:\n" + report.raw_personas)
    print("parsed personas:", report.personas)
    _check_and_show(report, config)
    if not report.personas:  # a 135M model often just echoes the task: try the dialogue stage on its own
        personas = [
            "a student who wants cheap headphones, budget $50, impatient",
            "a lawyer who needs a laptop, budget $1500, demanding",
        ]
        start = time.perf_counter()
        report = imagine_dialogues(model, tokenizer, config, personas)
        print(f"--- dialogues for given personas ({time.perf_counter() - start:.0f} s)")
        _check_and_show(report, config)
    if report.conversations:
        assert load_buffer(write_imagined_buffer(report, tmp_path / "smol"))


def _check_and_show(report: ImagineReport, config: ImagineConfig) -> None:
    summary = report.summary()
    keys = ("requested", "parsed", "parse_rate", "rejected", "critique_used", "critique_kept_original", "cut_off")
    print({k: summary[k] for k in keys})
    if report.raw_dialogues:
        print("raw dialogue 0:\n" + report.raw_dialogues[0])
    for conv in report.conversations[:1]:
        print("parsed conversation:", json.dumps(conv.to_dict(), indent=1))
    assert report.requested == report.parsed + sum(report.rejected.values())
    assert report.requested == config.dialogues_per_persona * len(report.personas)
    for conv in report.conversations:
        assert_valid(conv)
