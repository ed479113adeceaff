"""`iterppo`: every subcommand, its one-line purpose and where it is implemented, in one table.

    iterppo --help                      # this table
    iterppo SUBCOMMAND --help           # the subcommand's own options
    python -m iterppo_lightning ...     # the same command without the installed script

A subcommand's module is imported only when it runs: torch and Lightning load for the training
subcommands (LightningCLI, iterppo_lightning/commands/lightning_cli.py), never for `--help`,
`validate-data` or `report`, which start in well under a second.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    purpose: str
    """One line: `iterppo --help` lists it; a training subcommand's own --help starts with it."""
    entry: str
    """`module:function`, imported when the subcommand runs."""
    lightning: bool = False
    """A LightningCLI subcommand: the function parses the whole argument list (subcommand first) and exits on
    error. Otherwise the function gets the arguments after the subcommand and returns the exit code."""


_LIGHTNING = "iterppo_lightning.commands.lightning_cli:main"

COMMANDS: dict[str, Command] = {
    "fit": Command(
        "Train: pi_0, then per iteration collect conversations, fit the critic Q_k, PPO against it, evaluate.",
        _LIGHTNING,
        lightning=True,
    ),
    "evaluate": Command(
        "Score a saved policy on fresh simulated customers; prints one JSON object.", _LIGHTNING, lightning=True
    ),
    "sample": Command(
        "Print a saved policy's full dialogues with fresh simulated customers, readable in a terminal.",
        _LIGHTNING,
        lightning=True,
    ),
    "collect": Command(
        "Simulate conversations and write them as logs that `fit --data.logs` accepts.", _LIGHTNING, lightning=True
    ),
    "imagine": Command(
        "Imagined conversations from a chat LLM (personas, outcome-conditioned dialogues, critique) as a buffer.",
        _LIGHTNING,
        lightning=True,
    ),
    "bootstrap": Command(
        "Make pi_0 alone, exactly as `fit` would, into a new folder (for `fit --model.policy_init`).",
        _LIGHTNING,
        lightning=True,
    ),
    "validate-data": Command(
        "Check conversation logs against the schema (docs/data.md) and summarise them; writes nothing.",
        "iterppo_lightning.commands.validate_data:main",
    ),
    "probe-critic": Command(
        "Measure a finished simulated run's critic Q_k against pi_k's true values at logged states; writes nothing.",
        "iterppo_lightning.commands.probe_critic:main",
    ),
    "sweep": Command(
        "Run experiment configs x seeds, each a `fit` subprocess, resumably; index in OUT/sweep.json.",
        "iterppo_lightning.experiments.sweep:main",
    ),
    "report": Command(
        "Markdown tables and plots of a sweep.",
        "iterppo_lightning.experiments.report:main",
    ),
}


def overview() -> str:
    """What `iterppo --help` prints: usage and the table of subcommands."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: iterppo SUBCOMMAND [options]    (iterppo SUBCOMMAND --help: its options)",
        "",
        "Iterative PPO: a Q-critic on multi-turn conversations and token-level PPO against it, in an outer loop.",
        "",
        "subcommands:",
    ]
    lines += [f"  {name:<{width}}  {command.purpose}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _load(entry: str):
    module, function = entry.split(":")
    return getattr(importlib.import_module(module), function)


def main(args: list[str] | None = None) -> None:
    """`iterppo ARGS` (default: this process's arguments); ends with SystemExit unless a training run succeeds."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("-h", "--help"):
        print(overview())
        sys.exit(0)
    if not argv:
        print(f"{overview()}\n\niterppo: error: no subcommand given", file=sys.stderr)
        sys.exit(2)
    name = argv[0]
    command = COMMANDS.get(name)
    if command is None and not name.startswith("-"):
        print(f"iterppo: error: unknown subcommand {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    if command is None or command.lightning:
        # Options before the subcommand (`iterppo --config C fit`) are LightningCLI's to parse. None = this
        # process's arguments: LightningCLI warns when it is handed arguments beside the process's own.
        from iterppo_lightning.commands.run_config import RunConfigError, with_run_config

        try:
            given = argv
            argv = with_run_config(argv)  # evaluate, collect, sample: the config of a run folder
        except RunConfigError as err:
            print(f"iterppo: error: {err}", file=sys.stderr)
            sys.exit(2)
        if args is None and argv != given:
            sys.argv[1:] = argv
        descriptions = {n: c.purpose for n, c in COMMANDS.items() if c.lightning}
        _load(_LIGHTNING)(None if args is None else argv, descriptions)
        return
    sys.exit(_load(command.entry)(argv[1:]))


if __name__ == "__main__":
    main()
