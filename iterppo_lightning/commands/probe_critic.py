"""`iterppo probe-critic`: the critic probe on a finished simulated run, from its saved critic, policy and buffer.

    iterppo probe-critic --run_dir runs/quickstart --iteration 0
    iterppo probe-critic --run_dir runs/quickstart --iteration 2 --states 48 --continuations 32 --seed 1

Q_k (iteration_k/critic.pt) is measured against pi_k's true values at logged states of iteration_k/buffer
(loop/critic_probe.py; docs/critic.md says what each number means). With the settings the run used
(model.loop.critic_probe, the defaults of any option not given) it prints the numbers the run recorded.
It prints a table and then one JSON line, and writes nothing: the run folder is only read.

Exit codes: 0 done; 2 bad arguments or a run it cannot probe (no run there, an iteration out of range, a run on
logs or with an LLM customer, no critic, a buffer the simulator does not reproduce).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from iterppo_lightning.loop.probe_config import PROBE_PERSONAS, CriticProbeConfig
from iterppo_lightning.loop.run_state import RunStateError, load_run_state
from iterppo_lightning.utils.atomic_io import finite_json

__all__ = ["main", "build_parser", "format_report"]

PROG = "iterppo probe-critic"
SETTINGS = ("states", "continuations", "policy_samples", "seed", "pair_threshold", "persona")
PROBE_CRITICS = ("learned", "table")
"""What --critic scores the candidates with: the run's Q_k, or the table critic (loop/table_critic.py)."""


class ProbeCommandError(ValueError):
    """The run cannot be probed as asked; the message says why."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Measure a finished simulated run's critic Q_k against pi_k's true values, reply by reply, at logged "
            "states of iteration k (docs/critic.md). Prints a table and one JSON line; writes nothing."
        ),
        default_env=False,
    )
    parser.add_argument("--run_dir", type=str, required=True, help="the run's folder (written by `iterppo fit`)")
    parser.add_argument("--iteration", type=int, required=True, help="k: probe Q_k against pi_k on iteration k's data")
    defaults = CriticProbeConfig()
    helps = {
        "states": "logged states to probe",
        "continuations": "simulated continuations per (state, reply)",
        "policy_samples": "replies sampled from pi_k per state, beside the canonical moves",
        "seed": "the probe's seed",
        "pair_threshold": "pairs count when their true values differ by more than this",
    }
    for name, text in helps.items():
        kind = type(getattr(defaults, name))
        parser.add_argument(
            f"--{name}",
            type=kind | None,
            default=None,
            help=f"{text} (default: the run's, else {getattr(defaults, name)})",
        )
    parser.add_argument(
        "--persona",
        type=str,
        default=None,
        choices=PROBE_PERSONAS,
        help=f"the customer continuations play: {' or '.join(PROBE_PERSONAS)} (default: the run's, else posterior)",
    )
    parser.add_argument(
        "--batch_size", type=int | None, default=None, help="continuations per generate call (default: the run's)"
    )
    parser.add_argument(
        "--critic",
        type=str,
        default="learned",
        choices=PROBE_CRITICS,
        help=(
            "learned: the run's Q_k. table: a table of hand-read (state, reply) features fit on the same Monte Carlo "
            "returns (iteration k's own training conversations), which perceives the dialogue perfectly: what a "
            "pointwise critic could learn from this data (docs/critic.md)"
        ),
    )
    return parser


@dataclass
class _Run:
    """What the command reads of a run folder before loading any model."""

    path: Path
    config: dict
    seed: int
    completed: int


def _section(config: dict, *keys: str) -> dict:
    node = config
    for key in keys:
        node = (node or {}).get(key)
    node = node or {}
    return node.get("init_args", node) if isinstance(node, dict) else {}


def read_run(run_dir: str) -> _Run:
    """The run's config and state; a ProbeCommandError for a folder that is not a finished simulated run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ProbeCommandError(f"--run_dir {run_dir}: no such folder")
    try:
        state = load_run_state(path)
    except RunStateError as err:
        raise ProbeCommandError(f"--run_dir {run_dir}: {err}") from None
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ProbeCommandError(f"--run_dir {run_dir} has no config.yaml: the probe needs the run's settings")
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    model = config.get("model") or {}
    if state.mode == "logs" or (config.get("data") or {}).get("logs"):
        raise ProbeCommandError(
            f"{run_dir} trains on logs: logged customers cannot be replayed, so there is no ground truth to probe "
            "the critic against (the probe needs a run collected on the embedded simulator)"
        )
    if model.get("llm_customer") is not None:
        raise ProbeCommandError(
            f"{run_dir} talks to an LLM customer (model.llm_customer): it cannot be replayed from a seed, so there is "
            "no ground truth to probe the critic against (the probe needs the embedded simulator)"
        )
    if model.get("environment_class") is not None:
        raise ProbeCommandError(
            f"{run_dir} plays its own environment (model.environment_class): it cannot be replayed from a seed, so "
            "there is no ground truth to probe the critic against (the probe needs the embedded simulator)"
        )
    return _Run(path, config, int(state.seed), state.completed_iterations)


def probe_settings(run: _Run, args) -> CriticProbeConfig:
    """The command line's settings, else the run's model.loop.critic_probe, else the defaults."""
    saved = _section(run.config, "model", "loop").get("critic_probe") or {}
    values = {name: saved[name] for name in SETTINGS if name in saved}
    values.update({name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None})
    return CriticProbeConfig(**values)


def run_probe(
    run: _Run, k: int, settings: CriticProbeConfig, batch_size: int | None, critic_kind: str = "learned"
) -> dict:
    """Load Q_k (or fit the table critic), pi_k and iteration k's buffer and run the probe (imports torch)."""
    import torch

    from iterppo_lightning.data.buffer import load_buffer
    from iterppo_lightning.data.datamodule import in_validation
    from iterppo_lightning.env.sales_simulator import SimulatorConfig
    from iterppo_lightning.env.simulator_replay import ReplayMismatch
    from iterppo_lightning.loop.critic_probe import ProbeContext, run_critic_probe
    from iterppo_lightning.loop.run_dir import RunFolder
    from iterppo_lightning.loop.table_critic import TableCritic
    from iterppo_lightning.models.policy_folder import load_policy
    from iterppo_lightning.modules.critic import CriticModule

    config, model = run.config, run.config.get("model") or {}
    loop, data, policy = (
        _section(config, "model", "loop"),
        config.get("data") or {},
        _section(config, "model", "policy"),
    )
    folder = RunFolder(run.path, model.get("policy_init"))
    critic_file = folder.critic_file(0 if loop.get("offline") else k)  # offline: Q_0 serves every iteration
    if not critic_file.is_file():
        why = " (model.algorithm filtered_bc fits none)" if model.get("algorithm") == "filtered_bc" else ""
        raise ProbeCommandError(f"iteration {k} of {run.path} has no critic {critic_file}{why}")
    pi_k, tokenizer = load_policy(folder.policy_dir(k))
    context = ProbeContext(
        simulator=SimulatorConfig(**(model.get("environment") or {})),
        gamma=float(data.get("gamma", 0.9)),
        run_seed=run.seed,
        iteration=k,
        max_new_tokens=int(policy.get("max_new_tokens", 24)),
        temperature=float(loop.get("collect_temperature", 1.0)),
        policy_prompt_tokens=int(loop.get("max_prompt_tokens", 384)),
        critic_prompt_tokens=int(data.get("max_prompt_tokens", 384)),
        critic_action_tokens=int(data.get("max_action_tokens", 24)),
        batch_size=int(batch_size or loop.get("rollout_batch_size", 256)),
    )
    conversations = [c for c in load_buffer(folder.buffer_dir(k)) if c.iteration == k]
    if critic_kind == "table":
        fit_on = 0 if loop.get("offline") else k
        held_out = float(data.get("val_fraction", 0.1)), int(data.get("split_seed", 0))
        rows = conversations if fit_on == k else [c for c in load_buffer(folder.buffer_dir(fit_on)) if c.iteration == 0]
        critic = TableCritic(context.simulator, context.gamma).fit(
            c for c in rows if not in_validation(c.conversation_id, *held_out)
        )
    else:
        saved = torch.load(critic_file, weights_only=False)
        critic = CriticModule(**saved["hparams"])
        folder.load_critic(critic, critic_file, folder.policy_dir(0))
        critic.eval()
    try:
        return run_critic_probe(critic, pi_k, tokenizer, conversations, settings, context)
    except (ReplayMismatch, ValueError) as err:
        raise ProbeCommandError(str(err)) from None


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def format_report(record: dict, run_dir: str, k: int, critic_kind: str = "learned") -> str:
    """The table `iterppo probe-critic` prints above its JSON line."""
    what = f"Q_{k} of {run_dir}" if critic_kind == "learned" else f"the table critic fit on {run_dir}'s D_{k}"
    lines = [
        f"critic probe: {what} against pi_{k}'s true values ({record['states']} states, "
        f"{record['continuations']} continuations, persona {record['persona']}, seed {record['seed']})",
        f"{'move':<20}{'n':>5}{'mean Q':>9}{'true V':>9}",
    ]
    own = record["policy_samples_only"]
    for move, cell in record["by_move"].items():
        lines.append(f"{move:<20}{cell['n']:>5}{_f(cell['q']):>9}{_f(cell['true']):>9}")
    lines += [
        f"within-state corr {_f(record['within_state_corr'])} +- {_f(record['corr_se'])} over {record['corr_states']} "
        f"states (a perfect critic: about {_f(record['corr_ceiling'])}; the truth's two halves "
        f"{_f(record['true_split_corr'])})",
        f"pairwise acc      {_f(record['pairwise_acc'])} over {record['pairs']} pairs with |dV| > "
        f"{record['pair_threshold']}",
        f"pi_{k}'s own samples only: within-state corr {_f(own['within_state_corr'])} over {own['corr_states']} "
        f"states, pairwise acc {_f(own['pairwise_acc'])} over {own['pairs']} pairs",
        f"spread ratio      {_f(record['spread_ratio'])} (std of Q within a state {_f(record['q_spread'])}, "
        f"of V {_f(record['true_spread'])})",
        f"bias {_f(record['bias'], '+.3f')}  mae {_f(record['mae'])}  within-state error (std of Q - V) "
        f"{_f(record['within_state_error'])}  (mean Q {_f(record['mean_q'])}, mean V {_f(record['mean_true'])}; "
        f"standard error of one V {_f(record['true_se'])})",
    ]
    names = {
        "discount_decision": "with vs without discount",
        "ask_decision": "ask need vs recommend",
        "category_decision": "the asked-for category vs another",
    }
    for key, label in names.items():
        d = record[key]
        lines.append(
            f"{key} ({label}, {d['states']} states): Q {_f(d['q_a'])} vs {_f(d['q_b'])}, true {_f(d['true_a'])} vs "
            f"{_f(d['true_b'])} (difference {_f(d['true_diff'], '+.3f')} +- {_f(d['true_diff_se'])} per state); "
            f"sign agrees {_f(d['sign_agree'], '.2f')} of {d['decided']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 done, 2 bad arguments or a run it cannot probe)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on bad arguments (2)
        return int(exit_.code or 0)
    start = time.perf_counter()
    try:
        run = read_run(args.run_dir)
        if not 0 <= args.iteration < run.completed:
            finished = f"iterations 0..{run.completed - 1}" if run.completed else "no iteration yet"
            raise ProbeCommandError(
                f"--iteration {args.iteration} is out of range: {args.run_dir} has finished {finished}"
            )
        settings = probe_settings(run, args)
        record = run_probe(run, args.iteration, settings, args.batch_size, args.critic)
    except (ProbeCommandError, ValueError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(format_report(record, args.run_dir, args.iteration, args.critic))
    result = {"run_dir": args.run_dir, "iteration": args.iteration, "critic": args.critic, **record}
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(finite_json(result), allow_nan=False))  # strict JSON: an undefined metric is null
    return 0


if __name__ == "__main__":
    sys.exit(main())
