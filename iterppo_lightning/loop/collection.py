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
from typing import TYPE_CHECKING

from iterppo_lightning.data.buffer import buffer_conversation_ids
from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.log_io import (
    LogReport,
    LogValidationError,
    logs_fingerprint,
    read_logs_report,
    summarize_logs,
)
from iterppo_lightning.data.log_schema import DEFAULT_MAX_MESSAGE_CHARS, LogProblem
from iterppo_lightning.env.branching import branch_conversations
from iterppo_lightning.env.episodes import Exploration, episode_seeds, run_episodes
from iterppo_lightning.loop.run_state import RunState

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


@dataclass
class LogBatch:
    """One iteration's conversations (a batch of logs, or collected) and where they came from."""

    conversations: list[Conversation]
    source: dict
    """{"kind": "simulator"} or {"kind": "logs", "path", "sha256", ...}: the iteration's `trained_on` lineage."""
    warnings: list[str] = field(default_factory=list)
    """What the run should say about the batch (e.g. logs of another policy than pi_k)."""


def simulate_batch(loop: LoopView, k: int, episodes: int | None = None) -> list[Conversation]:
    """`episodes` conversations (default model.loop.episodes_per_iteration) of pi_k with fresh simulated customers;
    with model.loop.branch_fraction, that share of them are branches of the others (env/branching.py)."""
    cfg, policy = loop.config, loop.policy
    total = cfg.episodes_per_iteration if episodes is None else episodes
    branches = round(cfg.branch_fraction * total)
    settings = dict(
        max_new_tokens=policy.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        temperature=cfg.collect_temperature,
        batch_size=cfg.rollout_batch_size,
    )
    conversations = run_episodes(
        policy.policy,
        policy.tokenizer,
        loop.environment,
        episode_seeds("collect", loop.seed, k, total - branches),
        iteration=k,
        policy_id=f"pi_{k}",
        id_prefix=f"it{k}-",
        exploration=Exploration(cfg.explore_prob, cfg.explore_temperature, loop.seed) if cfg.explore_prob > 0 else None,
        progress=f"collect · iteration {k}",
        **settings,
    )
    if branches:
        conversations += branch_conversations(
            policy.policy,
            policy.tokenizer,
            loop.environment,
            conversations,
            branches,
            seed=loop.seed,
            iteration=k,
            reply_temperature=cfg.branch_temperature,
            **settings,
        )
    return conversations


def read_log_batch(
    path: str | Path,
    state: RunState,
    run_dir: Path,
    k: int,
    *,
    max_problems: int = 20,
    max_message_chars: int | None = DEFAULT_MAX_MESSAGE_CHARS,
) -> LogBatch:
    """Read and check the logs for iteration k; raises LogValidationError naming every problem.

    The batch's warnings: extra fields kept in metadata, no successes, logs of another policy than pi_k."""
    path = Path(path)
    sha = logs_fingerprint(path) if path.exists() else ""
    used = state.used_log_fingerprints()
    if sha in used:
        raise LogValidationError(
            str(path),
            [
                LogProblem(
                    str(path),
                    "",
                    "",
                    f"these logs were already trained on in iteration {used[sha]} of this run; give the next batch",
                )
            ],
        )
    # Before the first batch nothing is known about the logging policy; afterwards an id
    # that is neither this run's policy nor seen in earlier batches is most likely a mix-up.
    known = state.known_policy_ids() if k > 0 else None
    report = read_logs_report(
        path, max_problems=max_problems, known_policy_ids=known, max_message_chars=max_message_chars
    )
    conversations = report.conversations
    problems = _repeated_ids(path, report, run_dir, k)
    if k > 0:
        problems += _other_runs(path, report, state.run_id)
    if problems:
        raise LogValidationError(str(path), problems[:max_problems], total=len(problems))
    summary = summarize_logs(conversations)
    expected = f"pi_{k}"
    others = {pid: n for pid, n in summary["policy_ids"].items() if pid != expected}
    warnings = list(report.warnings)
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
        "format": report.format,
        "conversations": len(conversations),
        "policy_ids": summary["policy_ids"],
        "outcome_rate": summary["outcome_rate"],
    }
    return LogBatch(conversations, source, warnings)


def _repeated_ids(path: Path, report: LogReport, run_dir: Path, k: int) -> list[LogProblem]:
    """A conversation id already in an earlier batch of this run means the same conversation would count twice."""
    ids = set(report.locations)
    problems = []
    for j in range(k):
        buffer = run_dir / f"iteration_{j}" / "buffer"
        if buffer.is_dir():
            for cid in ids & set(buffer_conversation_ids(buffer)):
                message = f"{cid!r} was already trained on in iteration {j} of this run"
                problems.append(LogProblem(str(path), report.locations[cid], "conversation_id", message))
    return sorted(problems, key=lambda p: _location_order(p.location))


def _other_runs(path: Path, report: LogReport, run_id: str) -> list[LogProblem]:
    """Logs made by a policy exported from ANOTHER run (its card's run_id, kept by `iterppo collect`)."""
    problems = []
    for conv in report.conversations:
        other = conv.metadata.get("policy_run_id")
        if other is not None and other != run_id:
            message = (
                f"made by {conv.policy_id} of run {other!r}, not of this run ({run_id!r}): the logs of another run"
            )
            problems.append(
                LogProblem(str(path), report.locations[conv.conversation_id], "metadata.policy_run_id", message)
            )
    return problems


def _location_order(location: str) -> int:
    digits = location.rsplit(" ", 1)[-1]
    return int(digits) if digits.isdigit() else 0
