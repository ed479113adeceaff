"""`CollectionCallback`: at the start of iteration k, collect conversations with pi_k into a buffer."""

from __future__ import annotations

import time

from iterppo_lightning.buffer import save_buffer
from iterppo_lightning.rollout import episode_seeds, run_episodes, summarize_conversations

from .base import IterationCallback


class CollectionCallback(IterationCallback):
    def on_iteration_start(self, loop, iteration: int) -> None:
        start = time.perf_counter()
        cfg, policy = loop.config, loop.policy
        conversations = run_episodes(
            policy.policy,
            policy.tokenizer,
            loop.environment,
            episode_seeds("collect", loop.seed, iteration, cfg.episodes_per_iteration),
            iteration=iteration,
            policy_id=f"pi_{iteration}",
            id_prefix=f"it{iteration}-",
            max_new_tokens=policy.max_new_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            temperature=cfg.collect_temperature,
            batch_size=cfg.rollout_batch_size,
        )
        loop.buffer_path = save_buffer(conversations, loop.iteration_dir(iteration) / "buffer")
        stats = summarize_conversations(conversations)
        loop.record["collect"] = {"episodes": stats["episodes"], "success_rate": stats["success_rate"], "mean_turns": stats["mean_turns"]}
        loop.record["seconds"]["collect"] = time.perf_counter() - start
