"""`EvaluationCallback`: measure pi_0 and each new policy on fresh simulated customers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from iterppo_lightning.env.episodes import episode_seeds, run_episodes, summarize_conversations

from .base import IterationCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


def evaluate_policy(loop: LoopView, iteration: int) -> dict:
    """The policy module's current policy on the run's fixed evaluation customers; with eval_greedy_also, its
    greedy decoding on the same customers too (greedy_success_rate, greedy_ci95)."""
    cfg = loop.config
    result = _success_on_eval_customers(loop, iteration, greedy=cfg.eval_greedy)
    if cfg.eval_greedy_also and not cfg.eval_greedy:
        greedy = _success_on_eval_customers(loop, iteration, greedy=True)
        result.update(greedy_success_rate=greedy["success_rate"], greedy_ci95=greedy["ci95"])
    return result


def _success_on_eval_customers(loop: LoopView, iteration: int, greedy: bool) -> dict:
    cfg, policy = loop.config, loop.policy
    # Same evaluation customers for every policy of the run (namespace "eval",
    # iteration fixed at 0): differences between iterations are the policy's, not the customers'.
    conversations = run_episodes(
        policy.policy,
        policy.tokenizer,
        loop.environment,
        episode_seeds("eval", loop.seed, 0, cfg.eval_episodes),
        iteration=iteration,
        max_new_tokens=policy.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        greedy=greedy,
        batch_size=cfg.rollout_batch_size,
        progress=f"evaluate · pi_{iteration + 1}" + (" (greedy)" if greedy else ""),
    )
    stats = summarize_conversations(conversations, gamma=loop.datamodule.gamma)
    return {
        "success_rate": stats["success_rate"],
        "ci95": stats["ci95"],
        "mean_return": stats["mean_return"],
        "mean_turns": stats["mean_turns"],
        "eval_episodes": stats["episodes"],
    }


class EvaluationCallback(IterationCallback):
    """True success on simulated customers; off (loop.eval_episodes 0) for runs on real logs only."""

    def on_run_start(self, loop: LoopView) -> None:
        if loop.initial_eval is None and loop.config.eval_episodes > 0:  # a resumed run already has it
            loop.initial_eval = evaluate_policy(loop, -1)

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        if loop.config.eval_episodes == 0:
            return
        start = time.perf_counter()
        record.update(evaluate_policy(loop, iteration))
        record["seconds"]["evaluate"] = time.perf_counter() - start
