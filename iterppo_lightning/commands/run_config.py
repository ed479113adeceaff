"""A run folder supplies the config of the commands that use its policies: evaluate, collect, sample.

    iterppo evaluate --run_dir runs/quickstart                    # its config.yaml, its final_policy
    iterppo evaluate --policy runs/quickstart/final_policy        # the same: the policy's run is found
    iterppo sample --config runs/quickstart/config.yaml --policy runs/quickstart/pi_0/policy -n 3

`with_run_config` rewrites such a command line before LightningCLI parses it: the run's saved
config.yaml comes first (so every option given after it still wins), without the keys only `fit`
takes (`ckpt_path`, `weights_only`: the saved config holds them as `fit` parsed them). It imports
nothing heavy: it runs before the subcommand's module is loaded.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["RUN_COMMANDS", "FIT_ONLY_KEYS", "RunConfigError", "with_run_config", "find_run_dir", "saved_config_text"]

RUN_COMMANDS = ("evaluate", "collect", "sample")
"""The subcommands that read a run's config from --run_dir, from their --policy's run, or from its config.yaml."""
FIT_ONLY_KEYS = ("ckpt_path", "weights_only")
"""Arguments of `Trainer.fit` that a run's config.yaml records and the other subcommands do not take."""
DEFAULT_POLICY = "final_policy"
"""The policy of a run that `evaluate` and `sample` use when given --run_dir without --policy."""
_SHORT_OPTIONS = {
    "evaluate": {"-c": "--config"},
    "collect": {"-c": "--config"},
    "sample": {"-c": "--config", "-n": "--dialogues"},
}
_BARE_FLAGS = ("--greedy",)
"""Boolean options that may be given without a value (`--greedy` = `--greedy true`)."""
_BOOLEANS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


class RunConfigError(ValueError):
    """The run folder or config file named on the command line cannot supply a config."""


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "run_state.json").is_file()


def find_run_dir(policy: str | Path) -> Path | None:
    """The run folder a policy folder belongs to (RUN/final_policy, RUN/iteration_k/policy, RUN/pi_0/policy), or
    None. Both the path as given and its target are tried: a policy copied out of its run has none."""
    given = Path(policy)
    candidates = [given.parent, given.parent.parent]
    if given.exists():
        resolved = given.resolve()
        candidates += [resolved.parent, resolved.parent.parent]
    return next((c for c in candidates if is_run_dir(c)), None)


def saved_config_text(path: str | Path) -> str | None:
    """A config file without the keys only `fit` takes, as YAML text; None when it has none of them (use it as is)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RunConfigError(f"cannot read the config {str(path)!r}: {err}") from None
    if not isinstance(config, dict) or not any(key in config for key in FIT_ONLY_KEYS):
        return None
    kept = {key: value for key, value in config.items() if key not in FIT_ONLY_KEYS}
    return yaml.safe_dump(kept, sort_keys=False)


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    """(option, value) pairs: `--key value` and `--key=value` alike; a lone token is (token, None)."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and "=" in token:
            key, value = token.split("=", 1)
            pairs.append((key, value))
            i += 1
        elif token in _BARE_FLAGS and (i + 1 == len(argv) or argv[i + 1].lower() not in _BOOLEANS):
            pairs.append((token, None))
            i += 1
        elif token.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((token, argv[i + 1]))
            i += 2
        else:
            pairs.append((token, None))
            i += 1
    return pairs


def _value(pairs: list[tuple[str, str | None]], key: str) -> str | None:
    values = [value for option, value in pairs if option == key]
    return values[-1] if values else None


def with_run_config(argv: list[str]) -> list[str]:
    """`SUBCOMMAND ARGS` with the run's config supplied; unchanged for other subcommands.

    - `--run_dir RUN`: RUN/config.yaml first (RunConfigError when RUN holds no run); `evaluate` and `sample`
      without --policy use RUN/final_policy.
    - no --config and no --run_dir, but `--policy P` inside a run folder: that run's config.
    - `--config FILE` holding `fit`-only keys (a run's config.yaml): the same config without them.
    - `sample -n N` is `--dialogues N`; a bare `--greedy` is `--greedy true`.
    """
    if not argv or argv[0] not in RUN_COMMANDS:
        return list(argv)
    command = argv[0]
    pairs = _split(argv[1:])
    short = _SHORT_OPTIONS.get(command, {})
    pairs = [(short.get(option, option), value) for option, value in pairs]
    pairs = [
        (option, "true") if option in _BARE_FLAGS and value is None else (option, value) for option, value in pairs
    ]
    rewritten: list[tuple[str, str | None]] = []
    for option, value in pairs:
        if option == "--config" and value is not None and Path(value).is_file():
            value = saved_config_text(value) or value
        rewritten.append((option, value))

    run_dir, policy = _value(pairs, "--run_dir"), _value(pairs, "--policy")
    first: list[tuple[str, str | None]] = []
    if run_dir is not None:
        if not is_run_dir(Path(run_dir)):
            raise RunConfigError(
                f"--run_dir {run_dir!r} holds no run (no config.yaml and run_state.json): give the folder "
                "`iterppo fit --run_dir` wrote"
            )
        if policy is None and command != "collect":  # collect without --policy: the scripted agents
            rewritten.append(("--policy", str(Path(run_dir) / DEFAULT_POLICY)))
    elif policy and _value(pairs, "--config") is None:
        run_dir = str(found) if (found := find_run_dir(policy)) is not None else None
    if run_dir is not None:
        config_file = Path(run_dir) / "config.yaml"
        first.append(("--config", saved_config_text(config_file) or str(config_file)))
    out = [command]
    for option, value in first + rewritten:
        out += [option] if value is None else [option, value]
    return out
