"""The oracle critic (loop/oracle_critic.py): Q of PPO's replies from simulator continuations under pi_k.

Its Q is the critic probe's ground truth (tests/loop/test_critic_probe.py) for the same state, reply and streams;
it ranks a clearly better reply higher; it is refused where there is no simulator to replay; and a real smoke
fit with it finishes, and resumes after a kill to the numbers of the uninterrupted run.
"""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import SMOKE, run_cli
from torch import nn

from iterppo_lightning.data.padding import pad_left, pad_right
from iterppo_lightning.data.rendering import render_state
from iterppo_lightning.env.reply_parser import CATEGORIES, TIERS
from iterppo_lightning.env.sales_simulator import SimulatorConfig
from iterppo_lightning.env.scripted_agents import recommend
from iterppo_lightning.loop import critic_probe as cp
from iterppo_lightning.loop.config import CriticProbeConfig, LoopConfig
from iterppo_lightning.loop.oracle_critic import OracleCritic
from iterppo_lightning.loop.probe_config import OracleCriticConfig
from iterppo_lightning.loop.variants import check_variant_settings

PROBE = CriticProbeConfig(states=8, continuations=4, policy_samples=0, seed=3)


class ConstantCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # score_pairs reads the device from a parameter

    def q_mean(self, ids: torch.Tensor, mask: torch.Tensor, reply_starts=None) -> torch.Tensor:
        return torch.full((ids.shape[0],), 0.5, dtype=torch.float64)


def context(**overrides) -> cp.ProbeContext:
    values = dict(simulator=SimulatorConfig(), gamma=0.9, run_seed=0, iteration=0, max_new_tokens=8)
    return cp.ProbeContext(**{**values, **overrides})


def state_tokens(tokenizer, conversation, turn: int) -> list[int]:
    """A logged state's tokens as the policy batches hold them (TurnExample.prompt_ids)."""
    return tokenizer(render_state(conversation, turn, tokenizer), add_special_tokens=False)["input_ids"]


def make_oracle(tiny_model, tokenizer, conversations, settings, **ctx) -> OracleCritic:
    lengths = {(c.conversation_id, t): len(state_tokens(tokenizer, c, t)) for c in conversations for t in c.agent_turns}
    return OracleCritic(tiny_model, tokenizer, conversations, lengths, settings, context(**ctx))


def rollout_rows(tokenizer, rows: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """[state; reply <end>] rows as a rollout holds them: prompts left-padded, replies right-padded."""
    prompts = [state_tokens(tokenizer, conversation, turn) for conversation, turn, _ in rows]
    replies = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for *_, text in rows]
    prompt_ids, prompt_mask = pad_left(prompts, tokenizer.pad_token_id)
    reply_ids, reply_mask = pad_right(replies, tokenizer.pad_token_id)
    states = [(conversation.conversation_id, turn) for conversation, turn, _ in rows]
    return torch.cat([prompt_ids, reply_ids], 1), torch.cat([prompt_mask, reply_mask], 1), states


@pytest.fixture()
def probed(tiny_model, tokenizer, conversations, monkeypatch):
    """One probe run: its states, with every canonical move's continuation returns."""
    seen = {}
    real = cp.summarize

    def keep(states, settings, ctx):
        seen["states"] = states
        return real(states, settings, ctx)

    monkeypatch.setattr(cp, "summarize", keep)
    cp.run_critic_probe(ConstantCritic(), tiny_model, tokenizer, conversations, PROBE, context())
    return seen["states"]


def test_oracle_scores_equal_the_probe_truth(probed, tiny_model, tokenizer, conversations) -> None:
    """With the probe's streams, the oracle's Q of a (state, reply) row is the probe's true value of it: the same
    continuations, from token rows with padding, whatever the other rows."""
    settings = OracleCriticConfig(continuations=PROBE.continuations, persona=PROBE.persona, seed=PROBE.seed)
    oracle = make_oracle(tiny_model, tokenizer, conversations, settings)
    probe_base = (0, 0, "critic_probe", PROBE.seed)
    oracle.stream_base = lambda rollout: probe_base
    rows, truths = [], []
    for st in probed:
        for text, returns in zip(st.texts, st.returns):
            rows.append((st.conversation, st.turn, text))
            truths.append(sum(returns) / len(returns))
    ids, mask, states = rollout_rows(tokenizer, rows)
    assert [oracle.reply_text(i, m, s) for i, m, s in zip(ids, mask, states)] == [text for *_, text in rows]
    q = oracle.score(ids, mask, states)
    assert q.dtype == torch.float32 and q.shape == (len(rows),)
    assert q.tolist() == pytest.approx(truths)
    # Rows scored in other calls, in another order: the same values.
    half = len(rows) // 2
    again = torch.cat(
        [oracle.score(ids[half:], mask[half:], states[half:]), oracle.score(ids[:half], mask[:half], states[:half])]
    )
    assert torch.equal(torch.cat([again[-half:], again[:-half]]), q)
    assert oracle.stats["rows"] == 2 * len(rows) and oracle.stats["continuations"] == 2 * len(rows) * 4


def test_the_rollout_index_seeds_the_continuations(tiny_model, tokenizer, conversations) -> None:
    oracle = make_oracle(tiny_model, tokenizer, conversations, OracleCriticConfig(continuations=4))
    # A guess, whose success depends on the hidden customer each continuation draws.
    guess = recommend(TIERS[0], CATEGORIES[0], discount=True)
    rows = [(c, t, guess) for c in conversations[:10] for t in c.agent_turns[:2]]
    ids, mask, states = rollout_rows(tokenizer, rows)
    first = oracle.score(ids, mask, states, rollout=0)
    assert torch.equal(oracle.score(ids, mask, states, rollout=0), first)
    assert not torch.equal(oracle.score(ids, mask, states, rollout=1), first)
    other_seed = make_oracle(tiny_model, tokenizer, conversations, OracleCriticConfig(continuations=4, seed=1))
    assert not torch.equal(other_seed.score(ids, mask, states, rollout=0), first)


@pytest.mark.parametrize("persona", ["posterior", "logged"])
def test_a_clearly_better_reply_scores_higher(probed, tiny_model, tokenizer, conversations, persona) -> None:
    """Need and budget known: the right product with a discount beats small talk and a product of another
    category, state by state."""
    oracle = make_oracle(tiny_model, tokenizer, conversations, OracleCriticConfig(continuations=8, persona=persona))
    decisive = [st for st in probed if st.stage == "need+budget"]
    assert decisive
    for st in decisive:
        moves = dict(zip(st.moves, st.texts))
        good, bad = moves["recommend_discount"], [moves["small_talk"], moves["wrong_product"]]
        ids, mask, states = rollout_rows(tokenizer, [(st.conversation, st.turn, t) for t in [good, *bad]])
        q = oracle.score(ids, mask, states).tolist()
        assert q[0] > max(q[1:]), (persona, st.conversation.conversation_id, st.turn, q)
        assert q[0] >= 0.5


def test_policy_module_passes_the_states_to_the_oracle(tiny_model, tokenizer, conversations) -> None:
    """PolicyModule.make_rollout hands each row's logged state and the rollout index to a critic that needs them,
    replies to one state on adjacent rows with group_size > 1; without state_keys it says what is missing."""
    from iterppo_lightning.modules.policy import PolicyModule

    seen = []

    class Recorder(nn.Module):
        needs_states = True

        def score(self, ids, mask, states, rollout):
            seen.append((list(states), rollout))
            return torch.zeros(ids.shape[0])

    module = PolicyModule(max_new_tokens=4, group_size=2, advantage="grpo")
    module.attach(tiny_model, tokenizer)
    module.attach_critic(Recorder())
    rows = [(c, c.agent_turns[0], "") for c in conversations[:3]]
    prompts = [state_tokens(tokenizer, c, t) for c, t, _ in rows]
    ids, mask = pad_left(prompts, tokenizer.pad_token_id)
    states = [(c.conversation_id, t) for c, t, _ in rows]
    module.make_rollout(ids, mask, states, rollout_index=5)
    assert sorted(s for part, _ in seen for s in part) == sorted(s for s in states for _ in range(2))
    assert {rollout for _, rollout in seen} == {5}
    with pytest.raises(RuntimeError, match="state_keys"):
        module.make_rollout(ids, mask)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="model.loop.oracle_critic.continuations must be >= 1"):
        OracleCriticConfig(continuations=0)
    with pytest.raises(ValueError, match="model.loop.oracle_critic.persona must be one of"):
        OracleCriticConfig(persona="random")


def _system(loop, llm_customer=None, algorithm="iterative_ppo", target="mc", ensemble_size=1):
    critic = SimpleNamespace(target=target, ensemble_size=ensemble_size)
    return SimpleNamespace(loop=loop, llm_customer=llm_customer, algorithm=algorithm, critic=critic)


@pytest.mark.parametrize(
    ("logs", "llm_customer", "algorithm", "named"),
    [
        ("logs.jsonl", None, "iterative_ppo", "data.logs"),
        (None, object(), "iterative_ppo", "LLM customer"),
        (None, None, "filtered_bc", "fits no critic"),
    ],
)
def test_the_oracle_is_refused_without_a_simulator_to_replay(logs, llm_customer, algorithm, named) -> None:
    loop = LoopConfig(oracle_critic=OracleCriticConfig())
    system = _system(loop, llm_customer, algorithm)
    datamodule = SimpleNamespace(logs=logs, pool_weights=[1.0])
    with pytest.raises(ValueError, match=f"model.loop.oracle_critic .*{named}.*set it to null"):
        check_variant_settings(system, datamodule)
    loop.oracle_critic = None
    check_variant_settings(system, datamodule)  # off: nothing to refuse


@pytest.mark.parametrize(("target", "ensemble_size"), [("td", 1), ("mc", 3)])
def test_the_oracle_refuses_critic_settings_it_would_ignore(target, ensemble_size) -> None:
    system = _system(LoopConfig(oracle_critic=OracleCriticConfig()), target=target, ensemble_size=ensemble_size)
    with pytest.raises(ValueError, match="model.loop.oracle_critic replaces the critic"):
        check_variant_settings(system, SimpleNamespace(logs=None, pool_weights=[1.0]))


ORACLE = ("--model.loop.oracle_critic", "{continuations: 4}", "--model.loop.critic_probe", "{states: 4}")


def _records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
        r["oracle_critic"].pop("seconds")
    return records


def test_a_smoke_fit_with_the_oracle_finishes_and_resumes_to_the_same_numbers(tmp_path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli("fit", "--config", str(SMOKE), *ORACLE, "--run_dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(run_dir)
    assert len(records) == 2
    for k, r in enumerate(records):
        assert r["critic"] == {"oracle": True, "fits": 0, "continuations": 4, "persona": "posterior", "seed": 0}
        assert r["critic_probe"] == {"skipped": "model.loop.oracle_critic: no critic is fitted to probe"}
        # smoke.yaml: 2 rollouts of 16 states, each reply's Q from 4 continuations.
        assert r["oracle_critic"]["rows"] == 32 and r["oracle_critic"]["continuations"] <= 32 * 4
        assert 0.0 <= r["ppo"]["mean_score"] <= 1.0
        assert not (run_dir / f"iteration_{k}" / "critic.pt").exists()

    killed_dir = tmp_path / "killed"
    killed = run_cli(
        "fit", "--config", str(SMOKE), *ORACLE, "--run_dir", str(killed_dir), env={"ITERPPO_FAILPOINT": "policy.step@3"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("fit", "--config", str(SMOKE), *ORACLE, "--run_dir", str(killed_dir), "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(killed_dir) == records
