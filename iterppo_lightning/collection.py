"""Where an iteration's conversations come from: the simulator with pi_k, or a batch of logs.

`simulate_batch` plays pi_k against fresh simulated customers. `read_log_batch`
validates a user's logs (docs/data.md) against the run's lineage: ids that
repeat earlier batches and files already trained on are refused (a
conversation must never count twice); logs from a policy other than the last
exported one are accepted with a warning, because Monte Carlo targets then
evaluate that policy, not pi_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .buffer import buffer_conversation_ids
from .conversation import Conversation
from .log_io import LogValidationError, logs_fingerprint, read_logs, summarize_logs
from .log_schema import LogProblem
from .rollout import episode_seeds, run_episodes
from .run_state import RunState


@dataclass
class LogBatch:
    conversations: list[Conversation]
    source: dict
    warnings: list[str] = field(default_factory=list)


def simulate_batch(loop, k: int) -> list[Conversation]:
    cfg, policy = loop.config, loop.policy
    return run_episodes(
        policy.policy,
        policy.tokenizer,
        loop.environment,
        episode_seeds("collect", loop.seed, k, cfg.episodes_per_iteration),
        iteration=k,
        policy_id=f"pi_{k}",
        id_prefix=f"it{k}-",
        max_new_tokens=policy.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        temperature=cfg.collect_temperature,
        batch_size=cfg.rollout_batch_size,
    )


def read_log_batch(path: str | Path, state: RunState, run_dir: Path, k: int, *, max_problems: int = 20) -> LogBatch:
    """Read and check the logs for iteration k; raises LogValidationError naming every problem."""
    path = Path(path)
    sha = logs_fingerprint(path) if path.exists() else ""
    used = state.used_log_fingerprints()
    if sha and sha in used and used[sha] != k:
        raise LogValidationError(
            str(path), [LogProblem(str(path), "", "", f"these logs were already trained on in iteration {used[sha]} of this run; give the next batch")]
        )
    # Before the first batch nothing is known about the logging policy; afterwards an id
    # that is neither this run's policy nor seen in earlier batches is most likely a mix-up.
    known = state.known_policy_ids() if k > 0 else None
    conversations = read_logs(path, max_problems=max_problems, known_policy_ids=known)
    _refuse_repeated_ids(path, conversations, run_dir, k)
    summary = summarize_logs(conversations)
    expected = f"pi_{k}"
    others = {pid: n for pid, n in summary["policy_ids"].items() if pid != expected}
    warnings = []
    if others:
        listed = ", ".join(f"{pid} ({n})" for pid, n in sorted(others.items()))
        warnings.append(
            f"{sum(others.values())} of {len(conversations)} conversations in {path} come from {listed}, not from "
            f"{expected} (the policy this iteration improves). Q_{k} fit by Monte Carlo evaluates the policies that "
            f"made the logs; critic.target fqe evaluates {expected} itself (docs/data.md)."
        )
    for conv in conversations:
        conv.iteration = k
    source = {
        "kind": "logs",
        "path": str(path.resolve()),
        "sha256": sha,
        "format": "parquet" if path.suffix == ".parquet" else "hf_dataset" if path.is_dir() else "jsonl",
        "conversations": len(conversations),
        "policy_ids": summary["policy_ids"],
        "outcome_rate": summary["outcome_rate"],
    }
    return LogBatch(conversations, source, warnings)


def _refuse_repeated_ids(path: Path, conversations: list[Conversation], run_dir: Path, k: int) -> None:
    """A conversation id already in an earlier batch of this run means the same conversation would count twice."""
    ids = {c.conversation_id for c in conversations}
    problems = []
    for j in range(k):
        buffer = run_dir / f"iteration_{j}" / "buffer"
        if buffer.is_dir():
            for cid in sorted(ids & set(buffer_conversation_ids(buffer))):
                problems.append(LogProblem(str(path), "", "conversation_id", f"{cid!r} was already trained on in iteration {j} of this run"))
    if problems:
        raise LogValidationError(str(path), problems[:20], total=len(problems))
