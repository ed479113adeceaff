"""The variants of docs/variants.md behind three seams, each picked once from the config.

- `DataSource`: where iteration k's conversations come from: pi_k on the simulator
  (`SimulatorSource`), a batch of logs (`LogSource`), or the fully offline
  baseline's one batch from pi_0, with one Q_0 for the whole run (`OfflineSource`);
- `CriticTargets`: what Q_k regresses on: Monte Carlo returns, the myopic reward, or
  TD(lambda) / FQE targets recomputed from the previous round's critic;
- `PolicyImprovement`: how pi_(k+1) is made from pi_k: PPO against Q_k
  (`PPOImprovement`, with its KL anchor), or filtered behaviour cloning
  (`FilteredBCImprovement`, no critic at all).

The controller (controller.py) calls these and nothing else variant-specific: a new
variant is a class here plus one line in the `choose_*` function that picks it.
They receive the controller as a `PhaseContext`: exactly the helpers (`fit_phase`,
`load_training_data`, `warn`, `seed_step`) and parts (`system`, `datamodule`, `folder`, `view`,
`trainer_factory`) a seam may use, and nothing else of the controller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from iterppo_lightning.data.vocabulary import unknown_token_warning
from iterppo_lightning.loop.bootstrap import behaviour_clone
from iterppo_lightning.loop.collection import LogBatch, simulate_batch
from iterppo_lightning.rl.critic_targets import lambda_return_targets, myopic_targets, sample_replies, score_pairs
from iterppo_lightning.utils.failpoints import failpoint

if TYPE_CHECKING:
    import lightning as L

    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.loop.run_dir import RunFolder
    from iterppo_lightning.loop.view import LoopView
    from iterppo_lightning.system import IterativePPO


class PhaseContext(Protocol):
    """What a seam sees of the controller (`OuterLoop` provides it)."""

    system: IterativePPO
    """The `model:` config object: critic, policy, loop settings."""
    datamodule: TrajectoryDataModule
    folder: RunFolder
    """The run folder's layout and commits."""
    view: LoopView
    """The typed view collection and callbacks get."""
    trainer_factory: Callable[..., L.Trainer]
    """`(phase, **trainer overrides) -> a fresh Trainer` for one phase fit."""

    def seed_step(self, iteration: int, step: str) -> None:
        """Reseed every generator from (run seed, iteration, step)."""

    def fit_phase(self, phase: str, module: Any, k: int, max_epochs: int, logs: str) -> L.Trainer:
        """One phase fit of `module` in a fresh Trainer; returns the Trainer."""

    def load_training_data(self, k: int) -> list[str]:
        """Give the DataModule iteration k's training buffers; returns their paths."""

    def warn(self, message: str) -> None:
        """Print a warning and record it in the iteration's metrics."""

    def policy_critic(self, k: int) -> Any:
        """What scores PPO's replies in iteration k: Q_k, the table critic (model.loop.table_critic) or the oracle
        critic of pi_k (model.loop.oracle_critic)."""


# -- where the conversations come from ------------------------------------------------------------


class DataSource:
    """Where iteration k's conversations come from, and which buffers and which Q it trains with."""

    def collect(self, loop: PhaseContext, k: int) -> LogBatch:
        """Iteration k's conversations and where they came from (rank 0 only)."""
        raise NotImplementedError

    def reuses_collection(self, k: int) -> bool:
        """True when iteration k collects nothing and trains on what an earlier iteration collected."""
        return False

    def training_buffers(self, folder: RunFolder, k: int, pool_weights: list[float]) -> tuple[list[str], list[float]]:
        """Iteration k's buffer and, with data.pool_weights, earlier ones (newest first), with their weights."""
        paths, weights = [], []
        for age, weight in enumerate(pool_weights):
            j = k - age
            if j < 0:
                break
            if weight > 0:
                paths.append(str(folder.buffer_dir(j)))
                weights.append(weight)
        return paths, weights

    def critic_iteration(self, k: int) -> int:
        """The iteration whose Q serves iteration k (k itself: every iteration fits its own Q_k)."""
        return k


class SimulatorSource(DataSource):
    """pi_k plays `episodes` fresh simulated customers each iteration (the online default)."""

    def __init__(self, episodes: int):
        self.episodes = episodes

    def collect(self, loop: PhaseContext, k: int) -> LogBatch:
        loop.seed_step(k, "collect")
        conversations = simulate_batch(loop.view, k, self.episodes)
        failpoint("collect.before_save")
        return LogBatch(conversations, {"kind": "simulator"})


class LogSource(DataSource):
    """A user's batch of logs, one iteration per batch (read and checked when the run was opened)."""

    def __init__(self, batch: LogBatch | None):
        self.batch = batch

    def collect(self, loop: PhaseContext, k: int) -> LogBatch:
        # Only now is pi_k's tokenizer there to say how much of the batch's text it can represent.
        batch = self.batch
        unknown = unknown_token_warning(batch.conversations, loop.system.policy.tokenizer, batch.source["path"])
        return batch if unknown is None else LogBatch(batch.conversations, batch.source, [*batch.warnings, unknown])


class OfflineSource(SimulatorSource):
    """The fully offline baseline: iteration 0 collects the whole run's budget with pi_0 and fits Q_0;
    later iterations collect nothing and train on that one buffer against Q_0."""

    def reuses_collection(self, k: int) -> bool:
        return k > 0

    def training_buffers(self, folder: RunFolder, k: int, pool_weights: list[float]) -> tuple[list[str], list[float]]:
        return [str(folder.buffer_dir(0))], [1.0]

    def critic_iteration(self, k: int) -> int:
        return 0


def _no_simulated_truth(system, datamodule) -> str | None:
    """Why a run has no simulator to replay its logged states in (what its critic's ground truth needs), or None."""
    if datamodule.logs:
        return f"it trains on data.logs ({datamodule.logs}), whose customers cannot be replayed"
    if system.llm_customer is not None:
        return "it talks to an LLM customer (model.llm_customer), which cannot be replayed from a seed"
    if system.algorithm == "filtered_bc":
        return "it runs model.algorithm filtered_bc, which fits no critic"
    return None


def check_variant_settings(system, datamodule) -> None:
    """Refuse combinations the baselines do not define, before any run_dir exists."""
    uses = (
        ("critic_probe", "measures Q_k against the embedded simulator's ground truth"),
        ("oracle_critic", "computes Q from the embedded simulator's continuations"),
        ("table_critic", "reads the embedded simulator's conversations with its own parsers"),
    )
    for key, what in uses:
        if getattr(system.loop, key, None) is None:
            continue
        no_truth = _no_simulated_truth(system, datamodule)
        if no_truth is not None:
            raise ValueError(
                f"model.loop.{key} {what}, which this run does not have: {no_truth}. Remove model.loop.{key} "
                "(set it to null)"
            )
    if system.loop.branch_fraction > 0 and (datamodule.logs or system.llm_customer is not None):
        source = f"data.logs ({datamodule.logs})" if datamodule.logs else "an LLM customer (model.llm_customer)"
        raise ValueError(
            f"model.loop.branch_fraction {system.loop.branch_fraction} goes back to states of the embedded "
            f"simulator's conversations, which {source} cannot replay: set model.loop.branch_fraction 0"
        )
    replacing = [k for k in ("oracle_critic", "table_critic") if getattr(system.loop, k, None) is not None]
    if len(replacing) == 2:
        raise ValueError(
            "model.loop.oracle_critic and model.loop.table_critic both replace the critic: set one of them to null"
        )
    for key in replacing:
        critic = system.critic
        if critic.target != "mc" or critic.ensemble_size > 1:
            raise ValueError(
                f"model.loop.{key} replaces the critic: no critic is fitted, so model.critic.target "
                f"{critic.target!r} and model.critic.ensemble_size {critic.ensemble_size} would be ignored. Leave "
                f"them at their defaults (mc, 1), or remove model.loop.{key}"
            )
    if system.loop.offline and datamodule.logs:
        raise ValueError(
            "model.loop.offline collects its one batch from the simulator with pi_0; it cannot train on "
            f"data.logs ({datamodule.logs}). Logs already train one iteration per batch: drop one of the two settings"
        )
    if getattr(datamodule, "imagined_weight", 0) > 0 and system.critic.target != "mc":
        raise ValueError(
            f"data.imagined_weight {datamodule.imagined_weight} pools the bootstrap's conversations with their Monte "
            f"Carlo returns, which model.critic.target {system.critic.target!r} would not recompute: use target mc, or "
            "data.imagined_weight 0"
        )
    if system.loop.offline and any(w > 0 for w in datamodule.pool_weights[1:]):
        raise ValueError(
            f"data.pool_weights {datamodule.pool_weights} pools earlier buffers, but model.loop.offline has only "
            "iteration 0's buffer: use [1.0]"
        )


def choose_data_source(config, logs: str | None, log_batch: LogBatch | None) -> DataSource:
    """model.loop.offline -> OfflineSource; data.logs -> LogSource; else SimulatorSource."""
    if logs:
        return LogSource(log_batch)
    if config.offline:  # the whole run's conversation budget, all from pi_0, at once
        return OfflineSource(config.episodes_per_iteration * config.iterations)
    return SimulatorSource(config.episodes_per_iteration)


# -- what Q_k regresses on ------------------------------------------------------------------------


class CriticTargets:
    """critic.target "mc": the Monte Carlo return G_i the examples were built with; one fit."""

    def first(self, loop: PhaseContext) -> dict | None:
        """Targets of the first fit, by (conversation_id, turn_index); None keeps the Monte Carlo returns."""
        return None

    def refits(self, critic) -> int:
        """Fits after the first one, each on targets recomputed with the critic just fitted."""
        return 0

    def refit(self, loop: PhaseContext) -> dict:
        raise NotImplementedError


class MyopicTargets(CriticTargets):
    """critic.target "myopic": the reward of the current turn only (the single-turn RLHF baseline)."""

    def first(self, loop: PhaseContext) -> dict | None:
        return myopic_targets(loop.datamodule.conversations)


class BootstrappedTargets(CriticTargets):
    """critic.target "td" (TD(lambda) on the logged next reply) or "fqe" (on pi_k's own next reply, lambda 0):
    a Monte Carlo fit, then critic.td_rounds refits on targets from the previous round's critic."""

    def __init__(self, fqe: bool):
        self.fqe = fqe

    def refits(self, critic) -> int:
        return critic.td_rounds

    def refit(self, loop: PhaseContext) -> dict:
        critic, dm, policy = loop.system.critic, loop.datamodule, loop.system.policy
        conversations = dm.conversations
        # Q at a conversation's opening state is never bootstrapped on: score only later turns.
        first = {c.conversation_id: c.agent_turns[0] for c in conversations if c.agent_turns}
        examples = [e for e in dm.all_examples if e.turn_index != first.get(e.conversation_id)]
        prompts = [e.prompt_ids for e in examples]
        if self.fqe:
            replies = sample_replies(
                policy.policy, policy.tokenizer, prompts, policy.max_new_tokens, temperature=policy.temperature
            )
            lam = 0.0
        else:
            replies = [e.action_ids for e in examples]
            lam = critic.td_lambda
        q = score_pairs(critic, prompts, replies, policy.tokenizer.pad_token_id)
        next_q = {(e.conversation_id, e.turn_index): value for e, value in zip(examples, q)}
        return lambda_return_targets(conversations, next_q, dm.gamma, lam)


def choose_critic_targets(target: str) -> CriticTargets:
    """critic.target -> its rule (the names critic.CRITIC_TARGETS accepts)."""
    rules = {
        "mc": CriticTargets,
        "myopic": MyopicTargets,
        "td": lambda: BootstrappedTargets(fqe=False),
        "fqe": lambda: BootstrappedTargets(fqe=True),
    }
    return rules[target]()


# -- how pi_(k+1) is made ----------------------------------------------------------------------------


class PolicyImprovement:
    """How pi_(k+1) is made from pi_k (and, for PPO, Q_k)."""

    uses_critic: bool
    """Whether the iteration fits Q_k first."""
    record_key: str
    """Where the iteration's record keeps the fit's metrics."""
    keeps_optimizer_state: bool
    """Whether the fit's optimizer state is saved with pi_(k+1) (policy.keep_optimizer_state carries it on)."""

    def start(self, policy) -> None:
        """pi_0 was just made (the policy module holds it)."""

    def restore(self, policy, pi0_dir) -> None:
        """A restarted process loaded pi_k into the policy module."""

    def fit(self, loop: PhaseContext, k: int) -> dict:
        """Fit pi_(k+1) in place of pi_k; returns the fit's metrics."""
        raise NotImplementedError

    def refitted(self, loop: PhaseContext) -> None:
        """pi_(k+1) was fitted before a restart: bring the modules to where `fit` left them."""


class PPOImprovement(PolicyImprovement):
    """Iterative PPO: pi_(k+1) = PPO from pi_k against the frozen Q_k, on the iteration's logged states."""

    uses_critic = True
    record_key = "ppo"
    keeps_optimizer_state = True

    def start(self, policy) -> None:
        """pi_0 was just made: kl_anchor pi_0 keeps it as the reference for the whole run."""
        if policy.kl_anchor == "pi_0":
            policy.pin_reference()

    def restore(self, policy, pi0_dir) -> None:
        """A restarted process loaded pi_k: kl_anchor pi_0 puts the saved pi_0 back as the reference."""
        if policy.kl_anchor == "pi_0":
            policy.pin_reference(pi0_dir)

    def fit(self, loop: PhaseContext, k: int) -> dict:
        policy, dm = loop.system.policy, loop.datamodule
        policy.attach_critic(loop.policy_critic(k))
        with dm.for_phase("policy"):
            loop.fit_phase("policy", policy, k, max_epochs=1, logs="policy_logs")
        return dict(policy.fit_stats)

    def refitted(self, loop: PhaseContext) -> None:
        """pi_(k+1) was fitted before a restart: the critic is Q_k, frozen, as after the fit."""
        loop.system.policy.attach_critic(loop.system.critic)


class FilteredBCImprovement(PolicyImprovement):
    """The filtered-BC baseline: fine-tune pi_k with the SFT loss on the agent turns of the successful
    conversations of this iteration's training buffers (its own, pooled ones, or offline iteration 0's)."""

    uses_critic = False
    record_key = "bc"  # cloning has no reference policy: the KL anchor does not apply
    keeps_optimizer_state = False  # the cloning module's optimizer is its own, not the policy module's

    def fit(self, loop: PhaseContext, k: int) -> dict:
        dm, policy = loop.datamodule, loop.system.policy
        loop.load_training_data(k)
        successes = [c for c in dm.conversations if c.success and c.agent_turns]
        stats = {"conversations": len(dm.conversations), "successful": len(successes)}
        # Behaviour cloning holds out whole conversations for its validation loss, as the critic does.
        if not any(not dm.in_validation(c.conversation_id) for c in successes):
            loop.warn(
                f"iteration {k}: no successful conversation to clone (outside the validation split); "
                f"pi_{k + 1} = pi_{k}"
            )
            return {**stats, "examples": 0}
        metrics = behaviour_clone(
            policy.policy,
            policy.tokenizer,
            successes,
            loop.system.filtered_bc,
            dm,
            loop.trainer_factory,
            loop.folder.iteration_dir(k) / "bc_logs",
        )
        return {**stats, "examples": len(dm.train_examples), **metrics}


def choose_policy_improvement(algorithm: str) -> PolicyImprovement:
    """model.algorithm -> how pi_(k+1) is made (the names config.ALGORITHMS accepts)."""
    return {"iterative_ppo": PPOImprovement, "filtered_bc": FilteredBCImprovement}[algorithm]()
