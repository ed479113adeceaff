"""The LLM customer: persona cards, one batched generate per round, judges, business fields, valid logs.

Most tests use the tiny random Llama (random text, seconds on CPU) or replace
`generate_chat` / `yes_probability` with stubs, so what a reply *says* is under
the test's control. One slow test runs SmolLM2 and prints its replies for a
human to judge the role-play.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_chat import build_tiny_llama, train_chat_tokenizer

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.llm_customer import (
    JUDGE_QUESTION,
    LLMCustomerConfig,
    LLMCustomerEnvironment,
    customer_messages,
)
from iterppo_lightning.env.sales_simulator import BUSINESS_MESSAGES, SalesSimulator, SimulatorConfig
from iterppo_lightning.models import chat_generation

ASK = "what are you looking for ?"


@pytest.fixture(scope="module")
def chat_tokenizer():
    return train_chat_tokenizer()


@pytest.fixture(scope="module")
def chat_model(chat_tokenizer):
    return build_tiny_llama(chat_tokenizer, seed=0)


def make_env(model, tokenizer, **overrides) -> LLMCustomerEnvironment:
    return LLMCustomerEnvironment(LLMCustomerConfig(**overrides), model, tokenizer)


def stub_replies(monkeypatch, script):
    """Replace generate_chat: `script(round, conversations)` -> replies; returns the recorded calls."""
    calls: list[list] = []

    def fake_generate_chat(model, tokenizer, conversations, **kwargs):
        calls.append(conversations)
        return script(len(calls), conversations)

    monkeypatch.setattr(chat_generation, "generate_chat", fake_generate_chat)
    return calls


def count_generations(monkeypatch, model) -> list[int]:
    """Wrap the chat models' batched sampler (`sample_responses`) for `model`; returns the batch size of every call."""
    from iterppo_lightning.models import chat_generation

    sizes: list[int] = []
    original = chat_generation.sample_responses

    def counting_sample(sampled_model, prompt_ids, *args, **kwargs):
        if sampled_model is model:
            sizes.append(prompt_ids.shape[0])
        return original(sampled_model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(chat_generation, "sample_responses", counting_sample)
    return sizes


def assert_valid_log(conversation: Conversation) -> None:
    """The repo's log validator accepts the record, and it survives JSON."""
    log_schema = pytest.importorskip(
        "iterppo_lightning.data.log_schema",
        reason="iterppo_lightning.data.log_schema is missing: log validation not checked",
    )
    record = json.loads(json.dumps(conversation.to_dict()))
    problems, parsed = log_schema.check_record(record)
    assert problems == [], problems
    assert parsed is not None and parsed.turns == conversation.turns


# ---------------------------------------------------------------------- episodes
def test_opening_turn_comes_from_the_persona_without_a_model_call(monkeypatch, chat_model, chat_tokenizer):
    sizes = count_generations(monkeypatch, chat_model)
    env = make_env(chat_model, chat_tokenizer)
    simulator = SalesSimulator()
    for seed in range(6):
        episode = env.new_episode(seed, f"c{seed}")
        scripted = simulator.new_episode(seed, f"c{seed}")
        (opening,) = episode.conversation.turns
        assert not episode.done and opening.outcome == 0 and opening.sent is None
        # Same customer as the scripted simulator: opening and persona, described on the card.
        assert opening.customer == scripted.conversation.turns[0].customer
        persona = scripted.persona
        assert episode.conversation.metadata["persona"] == persona.to_dict()
        assert episode.conversation.metadata["seed"] == seed
        card = episode.conversation.metadata["persona_card"]
        assert persona.need in card and persona.budget in card
        assert ("only after the seller has offered a discount" in card) == persona.price_sensitive
        assert env.new_episode(seed, "again").persona_card == card
    assert sizes == []


def test_step_batch_makes_one_generate_call_per_round(monkeypatch, chat_model, chat_tokenizer):
    torch.manual_seed(0)
    sizes = count_generations(monkeypatch, chat_model)
    env = make_env(chat_model, chat_tokenizer, max_agent_turns=3, max_new_tokens=8)
    episodes = [env.new_episode(seed, f"c{seed}") for seed in range(8)]
    suggestions = [ASK] * 5 + [None, "", "   "]
    env.step_batch(episodes, suggestions)
    assert sizes == [8]
    for episode, suggestion in zip(episodes, suggestions):
        first = episode.conversation.turns[0]
        assert first.suggestion == suggestion
        if suggestion == ASK:
            assert (first.sent, first.business_action) == (ASK, "accept")
        else:  # an abstain: the business writes its own neutral message
            assert first.business_action == "reject" and first.sent in BUSINESS_MESSAGES
        assert len(episode.conversation.turns) == 2
    live = [ep for ep in episodes if not ep.done]
    env.step_batch(live, ["what is your budget ?"] * len(live))
    assert sizes == [8, len(live)]


def test_customer_sees_its_card_and_the_roles_swapped(monkeypatch, chat_model, chat_tokenizer):
    calls = stub_replies(monkeypatch, lambda rnd, convs: [f"reply {rnd}"] * len(convs))
    env = make_env(chat_model, chat_tokenizer, accept_prob=0.0, edit_prob=1.0)
    episode = env.new_episode(3, "c3")
    episode.step(ASK)
    episode.step("what is your budget ?")
    messages = calls[-1][0]
    assert [m["role"] for m in messages] == ["system", "assistant", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert episode.persona_card in system and "[BUY]" in system and "one fact" in system
    turns = episode.conversation.turns
    assert messages[1]["content"] == turns[0].customer and messages[3]["content"] == "reply 1"
    # The customer reads what the business sent (here an edit), not the agent's suggestion.
    assert turns[0].business_action == "edit" and messages[2]["content"] == turns[0].sent != ASK
    assert messages[4]["content"] == turns[1].sent
    assert messages == customer_messages(episode.conversation, episode.persona_card, "[BUY]")[:5]


# ---------------------------------------------------------------------- judges
def test_marker_judge_ends_buyers_and_max_turns_ends_the_rest(monkeypatch, chat_model, chat_tokenizer):
    def script(rnd, convs):
        return ["ok , [BUY] it" if rnd == 1 and i in (0, 2) else "hmm , tell me more ." for i in range(len(convs))]

    calls = stub_replies(monkeypatch, script)
    env = make_env(chat_model, chat_tokenizer, max_agent_turns=3)
    episodes = [env.new_episode(seed, f"c{seed}") for seed in range(4)]
    rounds = 0
    while any(not ep.done for ep in episodes):
        live = [ep for ep in episodes if not ep.done]
        env.step_batch(live, [ASK] * len(live))
        rounds += 1
    assert rounds == 3 and [len(c) for c in calls] == [4, 2, 2]
    for i, episode in enumerate(episodes):
        conv = episode.conversation
        last = conv.turns[-1]
        assert last.terminal and episode.done
        if i in (0, 2):
            assert last.outcome == 1 and last.customer == "ok , [BUY] it"  # kept as generated
            assert len(conv.turns) == 2 and conv.metadata["judge_probs"] == [1.0]
            assert conv.metadata["ended"] == "purchase"
        else:
            assert last.outcome == 0 and not conv.success
            assert len(conv.agent_turns) == 3 and len(conv.turns) == 4
            assert conv.metadata["judge_probs"] == [0.0, 0.0, 0.0]
            assert conv.metadata["ended"] == "max_agent_turns"
        conv.policy_id = "pi_0"
        assert_valid_log(conv)
    with pytest.raises(RuntimeError, match="already finished"):
        episodes[0].step(ASK)


@pytest.mark.parametrize("threshold, bought", [(0.5, [True, False, True, False]), (0.95, [False] * 4)])
def test_model_judge_follows_the_threshold(monkeypatch, chat_model, chat_tokenizer, threshold, bought):
    stub_replies(monkeypatch, lambda rnd, convs: [f"sure , reply {i}" for i in range(len(convs))])
    judge_calls = []

    def fake_yes_probability(model, tokenizer, conversations, **kwargs):
        judge_calls.append((model, conversations))
        return [0.9, 0.1, 0.9, 0.1][: len(conversations)]

    monkeypatch.setattr(chat_generation, "yes_probability", fake_yes_probability)
    env = make_env(chat_model, chat_tokenizer, judge="model", judge_threshold=threshold, max_agent_turns=2)
    episodes = [env.new_episode(seed, f"c{seed}") for seed in range(4)]
    env.step_batch(episodes, [ASK] * 4)
    assert len(judge_calls) == 1
    judge_model, questions = judge_calls[0]
    assert judge_model is chat_model  # the judge defaults to the customer model
    question = questions[1][-1]["content"]
    assert episodes[1].persona_card in question and ASK in question and "sure , reply 1" in question
    assert question.endswith(JUDGE_QUESTION)
    for episode, expected, prob in zip(episodes, bought, [0.9, 0.1, 0.9, 0.1]):
        assert episode.done == expected and episode.conversation.success == expected
        assert episode.conversation.metadata["judge_probs"] == [prob]
        assert len(episode.conversation.turns) == 2 and episode.conversation.turns[-1].outcome == int(expected)


def test_separate_judge_model_is_used(monkeypatch, chat_model, chat_tokenizer):
    stub_replies(monkeypatch, lambda rnd, convs: ["fine ."] * len(convs))
    used = []
    monkeypatch.setattr(
        chat_generation,
        "yes_probability",
        lambda model, tok, convs, **kw: used.append((model, tok)) or [0.2] * len(convs),
    )
    judge = object()
    env = LLMCustomerEnvironment(LLMCustomerConfig(judge="model"), chat_model, chat_tokenizer, judge_model=judge)
    env.new_episode(0, "c0").step(ASK)
    assert used == [(judge, chat_tokenizer)]


# ---------------------------------------------------------------------- business and logs
def test_business_decisions_match_the_scripted_simulator(monkeypatch, chat_model, chat_tokenizer):
    """Same seed, same suggestions: the same accept/edit/reject stream as SalesSimulator (common random numbers)."""
    stub_replies(monkeypatch, lambda rnd, convs: ["i see ."] * len(convs))
    env = make_env(chat_model, chat_tokenizer, accept_prob=0.4, edit_prob=0.3, max_agent_turns=4)
    simulator = SalesSimulator(SimulatorConfig(accept_prob=0.4, edit_prob=0.3, reject_prob=0.3, max_agent_turns=4))
    suggestions = ["hello there !", None, "do you like music ?", "nice weather today ."]
    actions = set()
    for seed in range(12):
        ours, theirs = env.new_episode(seed, "x"), simulator.new_episode(seed, "x")
        for suggestion in suggestions:
            ours.step(suggestion)
            if not theirs.done:  # the scripted customer may run out of patience first
                theirs.step(suggestion)
        pairs = [(t.sent, t.business_action) for t in ours.conversation.turns[:-1]]
        scripted = [(t.sent, t.business_action) for t in theirs.conversation.turns[:-1]]
        assert len(pairs) == 4 and pairs[: len(scripted)] == scripted
        actions.update(action for _, action in pairs)
        ours.conversation.policy_id = "pi_1"
        assert_valid_log(ours.conversation)
    assert actions == {"accept", "edit", "reject"}


def test_run_episodes_with_the_tiny_llama_gives_valid_logs(chat_model, chat_tokenizer):
    """Drop-in for collection: rollout.run_episodes drives the LLM customer to the end."""
    from iterppo_lightning.env.episodes import run_episodes

    torch.manual_seed(0)
    policy = build_tiny_llama(chat_tokenizer, seed=1)
    env = make_env(chat_model, chat_tokenizer, max_agent_turns=2, max_new_tokens=8, accept_prob=0.5, edit_prob=0.3)
    conversations = run_episodes(policy, chat_tokenizer, env, list(range(6)), policy_id="pi_0", max_new_tokens=6)
    assert len(conversations) == 6
    for conv in conversations:
        assert conv.turns[-1].terminal and len(conv.metadata["judge_probs"]) == len(conv.agent_turns)
        assert_valid_log(conv)


def test_same_torch_seed_same_replies(chat_model, chat_tokenizer):
    def play() -> list[str]:
        torch.manual_seed(123)
        env = make_env(chat_model, chat_tokenizer, max_new_tokens=6)
        episodes = [env.new_episode(seed, "c") for seed in range(3)]
        env.step_batch(episodes, [ASK] * 3)
        return [ep.conversation.turns[-1].customer for ep in episodes]

    assert play() == play()


def test_explicit_persona_cards(monkeypatch, chat_model, chat_tokenizer):
    calls = stub_replies(monkeypatch, lambda rnd, convs: ["ok ."] * len(convs))
    cards = [
        "A retired teacher who wants a tablet.\nOpening: Hello, I need something for reading.",
        "A student on a budget.",
    ]
    env = make_env(chat_model, chat_tokenizer, persona_cards=cards)
    first, second = env.new_episode(4, "a"), env.new_episode(7, "b")
    assert first.persona_card == cards[0] and second.persona_card == cards[1]
    assert first.conversation.turns[0].customer == "Hello, I need something for reading."
    assert second.conversation.turns[0].customer == SalesSimulator().new_episode(7, "b").conversation.turns[0].customer
    assert "persona" not in first.conversation.metadata and first.conversation.metadata["persona_card"] == cards[0]
    env.step_batch([first, second], [ASK, ASK])
    assert cards[1] in calls[0][1][0]["content"]


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "field, value",
    [
        ("judge", "vibes"),
        ("buy_marker", " "),
        ("judge_threshold", 1.5),
        ("max_agent_turns", 0),
        ("max_new_tokens", 0),
        ("temperature", -0.1),
        ("accept_prob", 1.2),
        ("edit_prob", -0.1),
        ("persona_cards", []),
        ("persona_cards", ["fine", ""]),
        ("persona_cards", "one card"),
        ("batch_size", 0),
        ("max_prompt_tokens", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"llm_customer.{field}"):
        LLMCustomerConfig(**{field: value})


def test_accept_plus_edit_above_one_is_refused():
    with pytest.raises(ValueError, match=r"llm_customer.accept_prob \+ llm_customer.edit_prob"):
        LLMCustomerConfig(accept_prob=0.8, edit_prob=0.3)


def test_environment_refuses_bad_inputs(monkeypatch, chat_model, chat_tokenizer):
    stub_replies(monkeypatch, lambda rnd, convs: ["ok ."] * len(convs))
    plain = train_chat_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="customer tokenizer .* no chat template"):
        LLMCustomerEnvironment(LLMCustomerConfig(), chat_model, plain)
    with pytest.raises(ValueError, match="judge tokenizer .* no chat template"):
        LLMCustomerEnvironment(LLMCustomerConfig(judge="model"), chat_model, chat_tokenizer, judge_tokenizer=plain)
    env = make_env(chat_model, chat_tokenizer)
    episode = env.new_episode(0, "c0")
    with pytest.raises(ValueError, match="one suggestion per episode"):
        env.step_batch([episode], [ASK, ASK])
    with pytest.raises(ValueError, match="twice"):
        env.step_batch([episode, episode], [ASK, ASK])
    assert len(episode.conversation.turns) == 1  # refused batches change nothing

    def failing(model, tokenizer, conversations, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(chat_generation, "generate_chat", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        env.step_batch([episode], [ASK])
    (turn,) = episode.conversation.turns  # no sent message is left without a reply
    assert (turn.suggestion, turn.sent, turn.business_action) == (None, None, "none") and not episode.done


# ---------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_customer_replies(smollm2_folder):
    """Role-play with a real instruction model; the replies are printed for a human to judge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    env = LLMCustomerEnvironment(LLMCustomerConfig(judge="model", max_agent_turns=4), model, tokenizer)
    torch.manual_seed(0)
    episodes = [env.new_episode(seed, f"smol-{seed}") for seed in range(4)]
    for suggestion in (ASK, "what is your budget ?"):
        live = [ep for ep in episodes if not ep.done]
        env.step_batch(live, [suggestion] * len(live))
    for episode in episodes:
        conv = episode.conversation
        print(f"\n--- seed {episode.seed}\n{episode.persona_card}")
        for turn in conv.turns:
            print(f"  customer: {turn.customer!r}")
            if turn.sent is not None:
                print(f"  seller:   {turn.sent!r}")
        print(f"  judge P(yes) per reply: {[round(p, 3) for p in conv.metadata['judge_probs']]}")
        replies = [t.customer for t in conv.turns[1:]]
        assert replies and all(reply.strip() for reply in replies)
        conv.policy_id = "pi_0"
        assert_valid_log(conv)
