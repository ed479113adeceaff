"""The table critic (loop/table_critic.py): hand-read (state, reply) features and shrunk Monte Carlo means, worked
by hand; as PPO's reward model it scores each rollout row as the table scores its text, it is refused where it
cannot read the dialogue, and a smoke fit with it probes it and resumes after a kill to the same numbers."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
from cli_helpers import SMOKE, run_cli

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.env.sales_simulator import SimulatorConfig
from iterppo_lightning.env.scripted_agents import OptimalAgent, recommend
from iterppo_lightning.loop.config import LoopConfig
from iterppo_lightning.loop.probe_config import OracleCriticConfig, TableCriticConfig
from iterppo_lightning.loop.table_critic import TableCritic, TableRewardCritic, reply_key, state_key
from iterppo_lightning.loop.variants import check_variant_settings

SIM = SimulatorConfig()
OPENING = "hello , can you help me ?"
NEED = "i am looking for a phone ."


def conversation(cid: str, replies: list[str], customers: list[str], outcome: int) -> Conversation:
    """Agent replies answering `customers` in turn, then a terminal customer message with `outcome`."""
    turns = [Turn(customer=c, suggestion=r, sent=r, business_action="accept") for c, r in zip(customers, replies)]
    return Conversation(cid, turns + [Turn(customer="bye", outcome=outcome)])


def test_cells_are_shrunk_means_of_their_returns() -> None:
    ask, guess = OptimalAgent.ASK_NEED, recommend("premium", "laptop")
    rows = [conversation("a", [ask], [OPENING], 1), conversation("b", [guess], [OPENING], 0)]
    critic = TableCritic(SIM, gamma=0.9, prior=4.0).fit(rows)
    assert critic.rows == 2
    # The state cell: (1 + 0 + 4 x 0.5) / (2 + 4) = 0.5 (the overall mean is 0.5). A reply cell with one row:
    # (G + 4 x 0.5) / (1 + 4), so 0.6 for the ask and 0.4 for the guess; a reply never seen gets the state's 0.5.
    q = critic.score_replies(rows[0], 0, [ask, guess, OptimalAgent.ASK_BUDGET])
    assert q == pytest.approx([0.6, 0.4, 0.5])


def test_returns_are_discounted_per_turn() -> None:
    ask = OptimalAgent.ASK_NEED
    rows = [conversation("a", [ask, recommend("standard", "phone")], [OPENING, NEED], 1)]
    critic = TableCritic(SIM, gamma=0.5, prior=1.0).fit(rows)
    # Turn 0's return is 0.5 (the purchase one customer message later), turn 1's 1.0; overall mean 0.75.
    # Turn 0: its state cell (0.5 + 0.75) / 2 = 0.625, its own cell (0.5 + 0.625) / 2 = 0.5625.
    assert critic.score_replies(rows[0], 0, [ask]) == pytest.approx([0.5625])


def test_a_reply_is_read_against_what_the_customer_revealed() -> None:
    row = conversation("a", [OptimalAgent.ASK_NEED, "ok ."], [OPENING, NEED], 0)
    right, wrong = recommend("standard", "phone"), recommend("standard", "laptop")
    assert reply_key(row, 1, right, SIM)[:2] == ("product", "known")
    assert reply_key(row, 1, wrong, SIM)[:2] == ("product", "other")
    assert reply_key(row, 0, right, SIM)[:3] == ("product", "guess", "guess")  # nothing revealed at turn 0
    assert reply_key(row, 1, OptimalAgent.ASK_NEED, SIM)[-1] is True  # asked already: a repeat
    assert reply_key(row, 1, " ".join(["word"] * (SIM.max_reply_words + 1)), SIM) == ("long",)
    assert reply_key(row, 1, None, SIM) == ("abstain",)
    assert state_key(row, 0)[:2] == (False, False) and state_key(row, 1)[:2] == (True, False)


def test_an_empty_table_and_a_bad_prior_are_refused() -> None:
    with pytest.raises(ValueError, match="prior must be > 0"):
        TableCritic(SIM, gamma=0.9, prior=0.0)
    with pytest.raises(ValueError, match="no rows"):
        TableCritic(SIM, gamma=0.9).score_replies(conversation("a", ["ok ."], [OPENING], 0), 0, ["ok ."])


# -- as PPO's reward model (model.loop.table_critic) -------------------------------------------------------------


def test_the_reward_critic_scores_each_rollout_row_as_the_table_scores_its_text(tokenizer, conversations) -> None:
    from test_oracle_critic import rollout_rows, state_tokens

    table = TableCritic(SIM, gamma=0.9).fit(conversations)
    lengths = {(c.conversation_id, t): len(state_tokens(tokenizer, c, t)) for c in conversations for t in c.agent_turns}
    reward = TableRewardCritic(table, tokenizer, conversations, lengths)
    need_known = next(c for c in conversations if len(c.agent_turns) > 1)
    rows = [
        (need_known, 1, recommend("standard", "phone")),
        (need_known, 1, OptimalAgent.ASK_NEED),
        (conversations[0], 0, OptimalAgent.ASK_BUDGET),
    ]
    ids, mask, states = rollout_rows(tokenizer, rows)
    q = reward.score(ids, mask, states, rollout=7)
    expected = [table.score_replies(c, t, [text])[0] for c, t, text in rows]
    assert q.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 states for 3 rows"):
        reward.score(ids, mask, states[:2])


def _system(loop, target="mc", ensemble_size=1):
    critic = SimpleNamespace(target=target, ensemble_size=ensemble_size)
    return SimpleNamespace(loop=loop, llm_customer=None, algorithm="iterative_ppo", critic=critic)


def test_the_table_critic_is_refused_where_it_cannot_read_the_dialogue() -> None:
    simulated = SimpleNamespace(logs=None, pool_weights=[1.0])
    check_variant_settings(_system(LoopConfig(table_critic=TableCriticConfig())), simulated)
    with pytest.raises(ValueError, match=r"model.loop.table_critic .*data.logs.*set it to null"):
        check_variant_settings(
            _system(LoopConfig(table_critic=TableCriticConfig())), SimpleNamespace(logs="a.jsonl", pool_weights=[1.0])
        )
    both = LoopConfig(table_critic=TableCriticConfig(), oracle_critic=OracleCriticConfig())
    with pytest.raises(ValueError, match="both replace the critic"):
        check_variant_settings(_system(both), simulated)
    with pytest.raises(ValueError, match="model.loop.table_critic replaces the critic"):
        check_variant_settings(_system(LoopConfig(table_critic=TableCriticConfig()), target="td"), simulated)
    with pytest.raises(ValueError, match="model.loop.table_critic.prior must be > 0"):
        TableCriticConfig(prior=0)


TABLE = ("--model.loop.table_critic", "{prior: 4.0}", "--model.loop.critic_probe", "{states: 4, continuations: 2}")


def _records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return records


def test_a_smoke_fit_with_the_table_critic_probes_it_and_resumes_to_the_same_numbers(tmp_path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli("fit", "--config", str(SMOKE), *TABLE, "--run_dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(run_dir)
    assert len(records) == 2
    for k, r in enumerate(records):
        assert r["critic"]["table"] is True and r["critic"]["fits"] == 0 and r["critic"]["rows"] > 0
        assert r["critic_probe"]["states"] == 4  # the probe measures the table critic itself
        assert 0.0 <= r["ppo"]["mean_score"] <= 1.0
        assert not (run_dir / f"iteration_{k}" / "critic.pt").exists()

    killed_dir = tmp_path / "killed"
    env = {"ITERPPO_FAILPOINT": "policy.step@3"}
    killed = run_cli("fit", "--config", str(SMOKE), *TABLE, "--run_dir", str(killed_dir), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("fit", "--config", str(SMOKE), *TABLE, "--run_dir", str(killed_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(killed_dir) == records
