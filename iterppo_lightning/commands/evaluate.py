"""Evaluate a saved policy on fresh customers (simulated or LLM-played): success rate with a 95% CI."""

from __future__ import annotations

from iterppo_lightning.env.episodes import episode_seeds, run_episodes, summarize_conversations
from iterppo_lightning.models.policy_folder import load_policy


def evaluate_saved_policy(
    policy_dir: str,
    environment,
    episodes: int,
    seed: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    max_prompt_tokens: int = 384,
    batch_size: int = 256,
    gamma: float = 1.0,
) -> dict:
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    check_decoding(greedy, temperature)
    model, tokenizer = load_policy(policy_dir)
    conversations = run_episodes(
        model,
        tokenizer,
        environment,
        # Namespace "evaluate" is never used by `fit`, so these customers are unseen in training.
        episode_seeds("evaluate", seed, 0, episodes),
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        greedy=greedy,
        temperature=temperature,
        batch_size=batch_size,
        progress="evaluate",
    )
    stats = summarize_conversations(conversations, gamma=gamma)
    return {
        "success_rate": stats["success_rate"],
        "ci95": stats["ci95"],
        "mean_turns": stats["mean_turns"],
        "mean_return": stats["mean_return"],
        "episodes": stats["episodes"],
        "policy": str(policy_dir),
        "seed": seed,
        "decoding": "greedy" if greedy else "sample",
        "temperature": None if greedy else temperature,
    }


def check_decoding(greedy: bool, temperature: float) -> None:
    """--temperature must be positive, and means nothing with --greedy (refused rather than ignored)."""
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    if greedy and temperature != 1.0:
        raise ValueError(f"--greedy decodes without sampling: give --greedy or --temperature {temperature}, not both")
