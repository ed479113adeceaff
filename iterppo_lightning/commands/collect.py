"""`iterppo collect`: simulated conversations written in the log schema (docs/data.md), as a business would log them.

With `--policy DIR` the saved policy suggests every reply (its policy id comes
from the folder's lineage card); without it the scripted behaviour agent of the
config's `bootstrap.behaviour` plays the business's existing agents. Either
way the file is exactly what `fit --data.logs` and `validate-data` accept.
"""

from __future__ import annotations

from pathlib import Path

from iterppo_lightning.commands.evaluate import check_decoding
from iterppo_lightning.data.log_io import is_log_file_name, summarize_logs, write_logs
from iterppo_lightning.env.episodes import episode_seeds, run_episodes
from iterppo_lightning.env.factory import make_environment
from iterppo_lightning.env.scripted_agents import BehaviourAgent, play_episode
from iterppo_lightning.models.policy_folder import load_policy, read_card
from iterppo_lightning.utils.progress import with_progress

BEHAVIOUR_POLICY_ID = "behaviour"


def policy_card(policy_dir: str | Path) -> dict:
    """A policy folder's lineage card (exported by `fit`); a folder without one is named after itself."""
    card = read_card(policy_dir)
    return card if card is not None else {"policy_id": Path(policy_dir).resolve().name}


def collect_logs(
    system,
    output: str,
    episodes: int,
    seed: int,
    *,
    policy: str = "",
    greedy: bool = False,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> dict:
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    check_decoding(greedy, temperature)
    if not policy and temperature != 1.0:
        raise ValueError(f"--temperature {temperature} needs --policy: the scripted behaviour agent does not sample")
    if not output:
        raise ValueError("collect needs --output FILE (.jsonl, .jsonl.gz or .parquet)")
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{output!r} already exists; logs are never overwritten")
    if not is_log_file_name(out):
        raise ValueError(f"--output {output!r}: the name must end in .jsonl, .jsonl.gz or .parquet")
    if not policy and getattr(system, "environment_class", None) is not None:
        raise ValueError(
            "collect without --policy plays the scripted sales agent, which only knows the embedded simulator; "
            "this config plays model.environment_class: give --policy DIR (a saved policy folder)"
        )
    simulator = make_environment(system)  # the simulator, the LLM customer, or model.environment_class
    # Namespace "logs" is used by nothing else, so these customers are new to any run.
    seeds = episode_seeds("logs", seed, 0, episodes)
    if policy:
        model, tokenizer = load_policy(policy)
        card = policy_card(policy)
        policy_id = str(card["policy_id"])
        conversations = run_episodes(
            model,
            tokenizer,
            simulator,
            seeds,
            policy_id=policy_id,
            id_prefix=f"{policy_id}-{seed}-",
            max_new_tokens=system.policy.max_new_tokens,
            max_prompt_tokens=system.loop.max_prompt_tokens,
            greedy=greedy,
            temperature=temperature,
            batch_size=batch_size,
            progress="collect",
        )
    else:
        agent = BehaviourAgent(**system.bootstrap.behaviour)
        policy_id = BEHAVIOUR_POLICY_ID
        conversations = [
            play_episode(agent, simulator, s, f"{policy_id}-{seed}-{s}")
            for s in with_progress(seeds, "collect", len(seeds))
        ]
        for conv in conversations:
            conv.policy_id = policy_id
    for conv in conversations:
        conv.iteration = 0  # a run assigns its own iteration when it trains on the file
        if policy and card.get("run_id"):
            # Ids like pi_1 repeat across runs; the run id lets `fit` refuse another run's logs.
            conv.metadata["policy_run_id"] = card["run_id"]
    write_logs(conversations, out)
    summary = summarize_logs(conversations)
    return {"output": str(out), "policy_id": policy_id, **summary}
