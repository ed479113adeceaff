"""The LLM customer and judge behind an OpenAI-compatible chat endpoint: a real HTTP server on 127.0.0.1.

The server (tests/chat_server.py) plays a scripted customer that buys when the
seller names its need and budget, and a judge that answers yes/no. Failures
are injected by request number: retried statuses, a 401, a hang past the
timeout, a refused connection, a non-JSON answer.
"""

from __future__ import annotations

import json
import math
import threading

import pytest
from chat_server import BUY, ChatServer, free_port_url

from iterppo_lightning.env.chat_endpoint import (
    ChatEndpoint,
    ChatEndpointConfig,
    ChatEndpointError,
    ChatRequest,
    config_problems,
)
from iterppo_lightning.env.llm_customer import JUDGE_QUESTION, LLMCustomerConfig, LLMCustomerEnvironment

ASK = "what are you looking for ?"
FAST = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.001}


def endpoint(base_url: str, **overrides) -> ChatEndpoint:
    settings = {"base_url": base_url, "model": "scripted", **FAST, **overrides}
    return ChatEndpoint(ChatEndpointConfig(**settings), role="customer")


def make_env(base_url: str, judge: str = "marker", **overrides) -> LLMCustomerEnvironment:
    return LLMCustomerEnvironment(
        LLMCustomerConfig(judge=judge, max_agent_turns=3), customer_endpoint=endpoint(base_url, **overrides)
    )


def recommendation(episode) -> str:
    persona = episode.persona
    return f"i recommend the {persona.budget} {persona.need} ."


def assert_valid_log(conversation) -> None:
    from iterppo_lightning.data import log_schema

    conversation.policy_id = "pi_0"
    problems, parsed = log_schema.check_record(json.loads(json.dumps(conversation.to_dict())))
    assert problems == [] and parsed is not None and parsed.turns == conversation.turns


def one_request(ep: ChatEndpoint):
    return ep.complete_many([ChatRequest([{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=4)])


# ---------------------------------------------------------------------- conversations over HTTP
@pytest.mark.parametrize("judge", ["marker", "model"])
def test_a_round_over_the_endpoint_keeps_the_records_of_an_in_process_customer(judge, monkeypatch):
    monkeypatch.setenv("SHOP_API_KEY", "secret-123")
    with ChatServer() as server:
        env = make_env(server.base_url, judge=judge, api_key_env="SHOP_API_KEY", seed=7, temperature=0.3)
        episodes = [env.new_episode(seed, f"c{seed}") for seed in range(4)]
        env.step_batch(episodes, [ASK] * 4)
        env.step_batch(episodes, [recommendation(ep) if ep.seed % 2 == 0 else "nice weather ." for ep in episodes])
    for episode in episodes:
        conv = episode.conversation
        assert conv.turns[1].customer == f"i need a {episode.persona.need} ."  # stored exactly as returned
        if episode.seed % 2 == 0:
            assert episode.done and conv.success and conv.metadata["ended"] == "purchase"
            assert conv.turns[-1].customer == f"great , i will take it {BUY}" and conv.turns[-1].outcome == 1
            assert conv.metadata["judge_probs"] == [0.0, 1.0]
        else:
            assert not episode.done and conv.metadata["judge_probs"] == [0.0, 0.0]
        assert conv.metadata["customer"] == "llm" and conv.metadata["judge"] == judge
        assert len(conv.turns) == 3
        assert_valid_log(conv)
    customer = server.customer_requests()
    assert len(customer) == 8
    first = customer[0]
    assert first["model"] == "scripted" and first["temperature"] == 0.3 and first["max_tokens"] == 40
    systems = [r["messages"][0] for r in customer]  # requests run concurrently: in any order
    assert all(m["role"] == "system" for m in systems)
    assert all(any(ep.persona_card in m["content"] for m in systems) for ep in episodes)
    assert len({r["seed"] for r in customer}) == 8  # a seed per conversation and turn
    assert all(h["Authorization"] == "Bearer secret-123" for h in server.headers)
    judged = [r for r in server.requests if r not in customer]
    if judge == "model":  # the judge asks the customer's server by default, with its own defaults
        assert len(judged) == 8 and all(r["temperature"] == 0.0 and r["max_tokens"] == 8 for r in judged)
        assert all(r["messages"][-1]["content"].endswith(JUDGE_QUESTION) for r in judged)
    else:
        assert judged == []


def test_the_judge_uses_logprobs_when_the_server_returns_them():
    with ChatServer() as server:
        server.logprobs = {"Yes": math.log(0.6), "No": math.log(0.2), "Maybe": math.log(0.1)}
        judge = ChatEndpoint(ChatEndpointConfig(base_url=server.base_url, model="judge", logprobs=True), role="judge")
        env = LLMCustomerEnvironment(
            LLMCustomerConfig(judge="model", judge_threshold=0.7),
            customer_endpoint=endpoint(server.base_url),
            judge_endpoint=judge,
        )
        episode = env.new_episode(0, "c0")
        episode.step(ASK)
    (prob,) = episode.conversation.metadata["judge_probs"]
    assert prob == pytest.approx(0.75)  # P(yes) / (P(yes) + P(no)) of the first answer token
    assert episode.done and episode.conversation.success  # the judge decides (0.75 > 0.7), not the marker
    judged = [r for r in server.requests if r not in server.customer_requests()]
    assert judged[0]["logprobs"] is True and judged[0]["top_logprobs"] == 5


def test_concurrency_limit_is_respected():
    # Every request waits at a barrier of 3: the batch completes only if 3 are in flight together.
    with ChatServer(hold=threading.Barrier(3)) as server:
        env = make_env(server.base_url, concurrency=3)
        episodes = [env.new_episode(seed, f"c{seed}") for seed in range(9)]
        env.step_batch(episodes, [ASK] * 9)
    assert server.max_in_flight == 3 and len(server.requests) == 9
    assert all(len(ep.conversation.turns) == 2 for ep in episodes)


# ---------------------------------------------------------------------- failures
def test_server_errors_are_retried_then_succeed():
    with ChatServer(fail=lambda n, payload: 500 if n < 2 else None) as server:
        env = make_env(server.base_url, concurrency=1, max_retries=2)
        episode = env.new_episode(0, "c0")
        episode.step(ASK)
    assert len(server.requests) == 3 and episode.conversation.turns[-1].customer.startswith("i need")


def test_rate_limit_is_retried_and_gives_up_naming_the_endpoint():
    with ChatServer(fail=lambda n, payload: 429) as server:
        with pytest.raises(ChatEndpointError) as err:
            one_request(endpoint(server.base_url, max_retries=1))
    assert len(server.requests) == 2
    message = str(err.value)
    assert f"{server.base_url}/chat/completions" in message and "HTTP 429" in message and "2 attempts" in message


def test_unauthorized_is_not_retried_and_says_why():
    with ChatServer(fail=lambda n, payload: 401) as server:
        with pytest.raises(ChatEndpointError) as err:
            one_request(endpoint(server.base_url, max_retries=3))
    assert len(server.requests) == 1
    message = str(err.value)
    assert "HTTP 401" in message and "scripted failure 401" in message and "API key" in message
    assert "not retried" in message and server.base_url in message


def test_a_server_that_is_down_is_named_with_the_cause():
    url = free_port_url()
    with pytest.raises(ChatEndpointError, match="connection refused") as err:
        one_request(endpoint(url, max_retries=1))
    assert f"{url}/chat/completions" in str(err.value) and "2 attempts" in str(err.value)


def test_an_unknown_host_is_named_with_the_cause():
    with pytest.raises(ChatEndpointError, match="could not be resolved|connection failed") as err:
        one_request(endpoint("http://no-such-host.invalid/v1", max_retries=0))
    assert "no-such-host.invalid" in str(err.value)


def test_a_hanging_server_times_out_after_the_retries():
    with ChatServer(fail=lambda n, payload: "hang") as server:
        with pytest.raises(ChatEndpointError, match=r"no answer within timeout_s=0.2 s") as err:
            one_request(endpoint(server.base_url, timeout_s=0.2, max_retries=1))
    assert len(server.requests) == 2 and "2 attempts" in str(err.value)


@pytest.mark.parametrize("action, named", [("garbage", "not JSON"), ("no_choices", "no 'choices'")])
def test_an_answer_that_is_not_a_chat_completion_is_refused(action, named):
    with ChatServer(fail=lambda n, payload: action) as server:
        with pytest.raises(ChatEndpointError, match=named) as err:
            one_request(endpoint(server.base_url))
    assert len(server.requests) == 1 and server.base_url in str(err.value)


def test_a_batch_that_fails_mid_round_changes_nothing_and_can_be_retried():
    down = threading.Event()
    down.set()
    # The 4th request of the round and everything after it fail (the server went down mid-batch).
    with ChatServer(fail=lambda n, payload: 503 if n >= 3 and down.is_set() else None) as server:
        env = make_env(server.base_url, concurrency=2, max_retries=1)
        episodes = [env.new_episode(seed, f"c{seed}") for seed in range(6)]
        with pytest.raises(ChatEndpointError, match="customer endpoint .* HTTP 503"):
            env.step_batch(episodes, [ASK] * 6)
        for episode in episodes:  # no sent message without its reply, no judge verdict
            (turn,) = episode.conversation.turns
            assert (turn.suggestion, turn.sent, turn.business_action) == (None, None, "none")
            assert episode.conversation.metadata["judge_probs"] == [] and not episode.done
        down.clear()
        env.step_batch(episodes, [ASK] * 6)
    assert all(len(ep.conversation.turns) == 2 for ep in episodes)


# ---------------------------------------------------------------------- settings
def test_bad_settings_are_all_named_at_once():
    bad = ChatEndpointConfig(
        base_url="localhost:8000",
        model=" ",
        api_key_env="NO_SUCH_KEY_VARIABLE",
        timeout_s=0,
        max_retries=-1,
        concurrency=0,
        temperature=-1,
        max_tokens=0,
    )
    problems = config_problems(bad, "model.customer_endpoint", environ={})
    fields = ["base_url", "model", "api_key_env", "timeout_s", "max_retries"]
    fields += ["concurrency", "temperature", "max_tokens"]
    assert len(problems) == len(fields)
    for field, problem in zip(fields, problems):
        assert problem.startswith(f"model.customer_endpoint.{field} ")
    assert "NO_SUCH_KEY_VARIABLE" in problems[2] and "not set" in problems[2]
    assert config_problems(ChatEndpointConfig("https://api.example.com/v1", "m", "KEY"), "k", {"KEY": "x"}) == []


def test_an_environment_without_model_or_endpoint_is_refused():
    with pytest.raises(ValueError, match="needs a model and its tokenizer, or a customer endpoint"):
        LLMCustomerEnvironment(LLMCustomerConfig())
