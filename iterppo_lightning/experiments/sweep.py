"""`iterppo sweep`: experiment configs x seeds, each a `fit` subprocess, resumable, indexed in sweep.json.

    iterppo sweep --experiments configs/experiment/*.yaml --seeds 0 1 2 --out runs/sweep --jobs 2
    iterppo sweep --experiments configs/experiment/*.yaml --seeds 0 1 2 --out runs/sweep --jobs 2 --quick true

An experiment file states only what differs from the `base.yaml` in its folder, when there is one
(configs/experiment/): that base is applied first, as `--config base.yaml --config EXPERIMENT`, and a
base.yaml given among the experiments (the glob above) is not run as an experiment. A folder without a
base.yaml holds complete `fit` configs. Each (experiment, seed) runs

    python -m iterppo_lightning fit [--config BASE] --config EXPERIMENT --seed_everything SEED \\
        --run_dir OUT/<experiment file stem>/seed_SEED --trainer.enable_progress_bar false [--model.policy_init PI0]

with OMP_NUM_THREADS=1, at most --jobs at once; its stdout and stderr go to
OUT/<experiment>/seed_SEED.log (appended, one header line per attempt).

Resumable: run the same command again. A finished run (run_state.json says so)
is skipped, an interrupted or failed one is continued with `--resume true`, and
a run folder whose saved config differs from what the sweep would run now is
an error that names the run (nothing is launched).

Shared pi_0: experiments whose pi_0 recipe is the same (model.bootstrap,
model.environment, the data and trainer settings behaviour cloning reads, and no
policy_init / base_model / LoRA of their own) get ONE pi_0 per seed, made by
`iterppo bootstrap` into OUT/pi_0/<recipe hash>/seed_SEED and passed to their
runs as `--model.policy_init`. It is the pi_0 `fit` itself would bootstrap (same
seeds; tested). A run's recorded seconds then exclude pi_0; the index records
the pi_0's own seconds beside it. `--share_pi0 false` lets every run bootstrap
its own.

`--quick true` runs every experiment scaled down by the same factors
(QUICK_SCALE: fewer iterations, conversations, evaluation customers, PPO batches
and a smaller pi_0 recipe) into OUT/quick, so quick and full results never
mix. It keeps the ratios between experiments: an experiment that re-collects
twice as often still does.

OUT/sweep.json (OUT/quick/sweep.json with --quick), rewritten atomically at
every change, lists the experiments, seeds and per run: status, what this
invocation did (new / resumed / skipped), the run's own recorded seconds (sum of
its phase times, from run_state.json, so a skipped run keeps its original time)
and the process wall seconds the sweep measured.

Exit codes: 0 every run finished, 1 some run or pi_0 failed (named, with its
log), 2 bad arguments or configs (nothing launched), 130 / 143 interrupted by SIGINT / SIGTERM (the runs it
started get SIGTERM and stop resumably; one line says how to continue).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from iterppo_lightning.experiments.run_records import read_json as _read_json
from iterppo_lightning.experiments.run_records import read_run_state as _run_state
from iterppo_lightning.experiments.run_records import recorded_seconds
from iterppo_lightning.loop.run_state import config_differences
from iterppo_lightning.utils.atomic_io import atomic_write_json, is_temp_name
from iterppo_lightning.utils.interrupts import Interrupted, raise_on_interrupt

__all__ = ["main", "build_parser", "QUICK_SCALE", "quick_overrides", "SweepError"]

INDEX_FILE = "sweep.json"
BASE_FILE = "base.yaml"
"""The settings every experiment file in the same folder starts from (never an experiment itself)."""
QUICK_DIR = "quick"
PI0_DIR = "pi_0"

QUICK_SCALE: dict[str, int] = {
    "model.loop.iterations": 2,
    "model.loop.episodes_per_iteration": 4,
    "model.loop.eval_episodes": 4,
    "data.policy_batches": 4,
    "model.bootstrap.episodes": 4,
    "model.bootstrap.curriculum_steps": 4,
}
"""--quick: each of these settings is divided by its factor (rounded up; 0 stays 0), for every experiment alike."""

# Data settings behaviour cloning never reads: experiments differing only here share pi_0.
# Any other data key (including ones added later) keeps pi_0 separate: unknown means "may matter".
_DATA_NOT_IN_PI0 = {
    "policy_batches",
    "policy_batch_size",
    "critic_batch_size",
    "logs",
    "pool_weights",
    "imagined_weight",
    "max_message_chars",
    "imagined_buffer",  # the critic reads pi_0's imagined conversations; they never change pi_0
}

RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Every child: one intra-op thread (the tiny models gain nothing from more, and --jobs share the cores)."""


class SweepError(RuntimeError):
    """The sweep cannot start as asked (bad experiment, seeds, or a run folder that does not match)."""


# -- configs ----------------------------------------------------------------------------------------------


def resolve_config(config_files: list[Path], overrides: list[str]) -> str:
    """The full config `fit --config F1 --config F2 ... OVERRIDES` would run with (its `--print_config`)."""
    # Imported here: it loads torch and Lightning, which `iterppo sweep --help` does without.
    from iterppo_lightning.commands.lightning_cli import FitConfigError, resolve_fit_config

    try:
        return resolve_fit_config([str(path) for path in config_files], overrides)
    except FitConfigError as err:
        raise SweepError(str(err)) from None


def default_config() -> str:
    """The full config of `fit` with nothing set: a finished run that predates a key counts as having its default."""
    from iterppo_lightning.commands.lightning_cli import default_fit_config

    return default_fit_config()


def _get(config: dict, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def quick_overrides(config: dict) -> list[str]:
    """Dotted `fit` overrides that scale this resolved config down by QUICK_SCALE."""
    args = []
    for key, factor in QUICK_SCALE.items():
        value = _get(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            args += [f"--{key}", str(math.ceil(value / factor))]
    return args


def pi0_recipe(config: dict) -> dict | None:
    """What pi_0 depends on, or None when the experiment brings its own pi_0 (then it is never shared)."""
    model = config.get("model") or {}
    if model.get("policy_init") or model.get("base_model") or model.get("llm_customer") or _get(model, "policy.lora"):
        return None
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in _DATA_NOT_IN_PI0}
    return {
        "bootstrap": model.get("bootstrap"),
        "environment": model.get("environment"),
        "data": data,
        "trainer": config.get("trainer"),
    }


def _recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


# -- plan -----------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    name: str
    path: Path
    base: Path | None  # the folder's base.yaml, applied before `path`
    overrides: list[str]
    pi0_key: str | None

    @property
    def configs(self) -> list[Path]:
        return [self.path] if self.base is None else [self.base, self.path]

    @property
    def config_args(self) -> list[str]:
        return [arg for path in self.configs for arg in ("--config", str(path))]


@dataclass
class Job:
    kind: str  # "pi0" or "run"
    seed: int
    folder: Path  # the run dir, or the pi_0 folder
    log: Path
    args: list[str]  # after `python -m iterppo_lightning`
    experiment: str | None = None
    needs: Job | None = None
    action: str = "new"  # new / resumed / skipped (runs); new / existing (pi_0)
    status: str = "pending"  # pending / running / finished / failed / interrupted / blocked
    returncode: int | None = None
    process_seconds: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.experiment} seed {self.seed}" if self.kind == "run" else f"pi_0 seed {self.seed}"


def _is_empty_run_dir(folder: Path) -> bool:
    # A run killed before its first commit may leave only temporaries: `fit` treats that as new.
    return not folder.exists() or all(is_temp_name(p.name) or p.name == ".write_probe" for p in folder.iterdir())


def _experiments(paths: list[str], quick: bool, share_pi0: bool) -> list[Experiment]:
    experiments, names = [], {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise SweepError(f"experiment config {raw!r} does not exist (or is not a file)")
        if path.name == BASE_FILE:  # what the experiments beside it start from (`configs/experiment/*.yaml` lists it)
            continue
        base = path.parent / BASE_FILE
        base = base if base.is_file() else None
        name = path.stem
        if name in (QUICK_DIR, PI0_DIR):
            raise SweepError(
                f"experiment {raw!r}: the name {name!r} is reserved for the sweep's own folders; rename the file"
            )
        if name in names:
            raise SweepError(
                f"experiments {names[name]!r} and {raw!r} have the same name {name!r} "
                "(the file stem names the run folders)"
            )
        names[name] = raw
        configs = [path] if base is None else [base, path]
        try:
            config = yaml.safe_load(resolve_config(configs, []))
            overrides = quick_overrides(config) if quick else []
            if overrides:
                config = yaml.safe_load(resolve_config(configs, overrides))
        except SweepError as err:
            on = "" if base is None else f" (on top of {str(base)!r})"
            raise SweepError(f"experiment {raw!r}{on} is not a valid fit config:\n  {err}") from None
        recipe = pi0_recipe(config) if share_pi0 else None
        experiments.append(Experiment(name, path, base, overrides, None if recipe is None else _recipe_key(recipe)))
    if not experiments:
        raise SweepError(f"no experiment among {paths}: a {BASE_FILE} only holds what the experiments beside it share")
    return experiments


def plan(experiments: list[Experiment], seeds: list[int], root: Path) -> tuple[list[Job], list[Job]]:
    """(pi_0 jobs, run jobs), runs seed-major; raises SweepError naming every run whose folder does not match."""
    pi0_jobs: dict[tuple[str, int], Job] = {}
    runs: list[Job] = []
    mismatched: list[str] = []
    defaults: str | None = None  # the config with nothing set, resolved once when a finished run needs it
    for seed in seeds:
        for exp in experiments:
            run_dir = root / exp.name / f"seed_{seed}"
            args = [*exp.config_args, "--seed_everything", str(seed), "--run_dir", str(run_dir)]
            args += ["--trainer.enable_progress_bar", "false"]
            pi0 = None
            if exp.pi0_key is not None:
                folder = (root / PI0_DIR / exp.pi0_key / f"seed_{seed}").resolve()
                pi0 = pi0_jobs.get((exp.pi0_key, seed))
                if pi0 is None:
                    pi0 = Job(
                        "pi0",
                        seed,
                        folder,
                        folder.parent / f"seed_{seed}.log",
                        [
                            "bootstrap",
                            *exp.config_args,
                            "--seed_everything",
                            str(seed),
                            "--output",
                            str(folder),
                            "--trainer.enable_progress_bar",
                            "false",
                            *exp.overrides,
                        ],
                        experiment=exp.name,
                    )
                    pi0_jobs[(exp.pi0_key, seed)] = pi0
                args += ["--model.policy_init", str(folder / "policy")]
            overrides = args[len(exp.config_args) :] + exp.overrides  # what follows the config files
            args += exp.overrides
            job = Job(
                "run",
                seed,
                run_dir,
                run_dir.parent / f"seed_{seed}.log",
                ["fit", *args],
                experiment=exp.name,
                needs=pi0,
            )
            if not _is_empty_run_dir(run_dir):
                saved = run_dir / "config.yaml"
                if saved.exists():
                    resolved = resolve_config(exp.configs, overrides)
                    if defaults is None:
                        defaults = default_config()
                    diffs = config_differences(saved.read_text(encoding="utf-8"), resolved, set(), defaults)
                    if diffs:
                        shown = diffs[:5] + ([f"... and {len(diffs) - 5} more"] if len(diffs) > 5 else [])
                        mismatched.append(f"{exp.name} seed {seed} ({run_dir}):\n    " + "\n    ".join(shown))
                        continue
                state = _run_state(run_dir)
                if state is not None and state.get("finished"):
                    job.action, job.status = "skipped", "finished"
                else:
                    job.action = "resumed"
                    job.args += ["--resume", "true"]
            runs.append(job)
    if mismatched:
        raise SweepError(
            "these run folders hold runs made with another config than the sweep would run now "
            "(changed experiment file, --quick or pi_0 sharing); move them away or use another --out:\n  "
            + "\n  ".join(mismatched)
        )
    pi0 = []
    needed = {id(job.needs) for job in runs if job.needs is not None and job.status != "finished"}
    for job in pi0_jobs.values():
        if (job.folder / "policy").is_dir():
            job.action, job.status = "existing", "finished"
        elif id(job) not in needed:
            job.action, job.status = "unneeded", "finished"
        pi0.append(job)
    return pi0, runs


# -- what the runs recorded ------------------------------------------------------------------------------


def _run_entry(job: Job, previous: dict) -> dict:
    state = _run_state(job.folder) or {}
    history = state.get("history") or []
    seconds, includes_pi0 = recorded_seconds(job.folder)
    pi0 = job.needs.folder if job.needs is not None else None
    pi0_seconds = (_read_json(pi0 / "bootstrap.json") or {}).get("seconds") if pi0 is not None else None
    process = job.process_seconds
    if process is None and job.action == "skipped":
        process = previous.get("process_seconds")  # what an earlier invocation measured
    return {
        "experiment": job.experiment,
        "seed": job.seed,
        "run_dir": str(job.folder),
        "log": str(job.log),
        "status": job.status,
        "action": job.action,
        "returncode": job.returncode,
        "iterations": state.get("completed_iterations", 0),
        "final_success_rate": history[-1].get("success_rate") if history else None,
        "seconds": seconds,
        "seconds_include_pi0": includes_pi0,
        "pi0": None if pi0 is None else str(pi0),
        "pi0_seconds": pi0_seconds,
        "process_seconds": process,
    }


def _pi0_entry(job: Job, runs: list[Job]) -> dict:
    info = _read_json(job.folder / "bootstrap.json") or {}
    return {
        "seed": job.seed,
        "folder": str(job.folder),
        "log": str(job.log),
        "status": job.status,
        "action": job.action,
        "returncode": job.returncode,
        "seconds": info.get("seconds"),
        "process_seconds": job.process_seconds,
        "experiments": sorted({r.experiment for r in runs if r.needs is job}),
    }


class Index:
    """sweep.json: rewritten atomically whenever a job changes state."""

    def __init__(
        self, root: Path, command: str, quick: bool, experiments: list[Experiment], seeds: list[int], jobs: int
    ):
        self.path = root / INDEX_FILE
        old = _read_json(self.path) or {}
        self.previous = {(r.get("experiment"), r.get("seed")): r for r in old.get("runs", [])}
        self.start = time.perf_counter()
        self.head = {
            "command": command,
            "quick": quick,
            "quick_scale": QUICK_SCALE if quick else None,
            "out": str(root),
            "jobs": jobs,
            "seeds": seeds,
            "experiments": [
                {
                    "name": e.name,
                    "config": str(e.path),
                    "base": None if e.base is None else str(e.base),
                    "overrides": e.overrides,
                    "pi0_recipe": e.pi0_key,
                }
                for e in experiments
            ],
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def write(self, pi0: list[Job], runs: list[Job]) -> None:
        atomic_write_json(
            self.path,
            {
                **self.head,
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "invocation_seconds": time.perf_counter() - self.start,
                "seconds_note": (
                    "runs[].seconds: the phase times the run recorded (collect, critic, policy, evaluate per "
                    "iteration, plus pi_0 when seconds_include_pi0); a shared pi_0's own time is pi0_seconds. "
                    "process_seconds: the fit process's wall time measured by the sweep (start-up and pi_0's "
                    "evaluation included)."
                ),
                "pi0": [_pi0_entry(j, runs) for j in pi0],
                "runs": [_run_entry(j, self.previous.get((j.experiment, j.seed), {})) for j in runs],
            },
        )


# -- running --------------------------------------------------------------------------------------------


def _start(job: Job) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "iterppo_lightning", *job.args]
    with open(job.log, "a", encoding="utf-8") as log:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        log.write(f"=== {stamp} {job.action}: {shlex.join(command)}\n")
        log.flush()
        job.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **RUN_ENV}, start_new_session=True
        )
    job.status, job.started = "running", time.perf_counter()


def _say(message: str) -> None:
    print(message, flush=True)


def execute(pi0: list[Job], runs: list[Job], max_jobs: int, index: Index) -> None:
    queue = [j for j in pi0 + runs if j.status == "pending"]
    running: list[Job] = []
    index.write(pi0, runs)
    total = len(queue)
    try:
        while queue or running:
            for job in list(queue):
                if job.needs is not None and job.needs.status in ("failed", "blocked", "interrupted"):
                    job.status = "blocked"
                    queue.remove(job)
                    _say(f"blocked  {job.label}: its pi_0 failed (see {job.needs.log})")
                    index.write(pi0, runs)
            for job in list(queue):
                if len(running) >= max_jobs:
                    break
                if job.needs is not None and job.needs.status != "finished":
                    continue
                queue.remove(job)
                _start(job)
                running.append(job)
                _say(f"start    {job.label} ({job.action}) [{total - len(queue)}/{total}] log {job.log}")
                index.write(pi0, runs)
            time.sleep(0.2)
            for job in list(running):
                code = job.process.poll()
                if code is None:
                    continue
                running.remove(job)
                job.returncode, job.process_seconds = code, time.perf_counter() - job.started
                job.status = "finished" if code == 0 else "failed"
                _say(
                    f"{job.status:8} {job.label} in {job.process_seconds:.0f} s"
                    + ("" if code == 0 else f" (exit {code}, log {job.log})")
                )
                index.write(pi0, runs)
    except Interrupted:
        for job in running:  # only the processes this sweep started, each by its own group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGTERM)
        for job in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.process.wait(timeout=30)
            job.status, job.returncode = "interrupted", job.process.returncode
            job.process_seconds = time.perf_counter() - job.started
        index.write(pi0, runs)
        raise


# -- command line ---------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="iterppo sweep",
        description="Run every experiment config with every seed (each a `fit` subprocess), resumably; "
        "index in OUT/sweep.json.",
        default_env=False,
    )
    parser.add_argument(
        "--experiments",
        type=str,
        nargs="+",
        required=True,
        help=f"experiment configs; the file stem names the experiment. A {BASE_FILE} beside them is applied first "
        "(they state only what differs from it) and is not an experiment itself; without one they are complete configs",
    )
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds (seed_everything), e.g. 0 1 2")
    parser.add_argument(
        "--out", type=str, required=True, help="the sweep folder: OUT/<experiment>/seed_<seed>, OUT/sweep.json"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each one torch thread)")
    parser.add_argument(
        "--quick", type=bool, default=False, help="scale every experiment down by QUICK_SCALE, into OUT/quick"
    )
    parser.add_argument(
        "--share_pi0", type=bool, default=True, help="one pi_0 per seed for experiments with the same pi_0 recipe"
    )
    return parser


def _lock(root: Path):
    """An exclusive lock on OUT: two sweeps writing the same runs would each resume the other's."""
    import fcntl

    handle = open(root / ".sweep.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SweepError(
            f"another `iterppo sweep` is running on {str(root)!r}; wait for it (or stop it) first"
        ) from None
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and bad arguments (2)
        return int(exit_.code or 0)
    try:
        if args.jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
        if any(s < 0 for s in args.seeds):
            raise SweepError(f"--seeds must be non-negative integers, got {args.seeds}")
        if len(set(args.seeds)) != len(args.seeds):
            raise SweepError(f"--seeds repeats a seed: {args.seeds}")
        root = Path(args.out) / QUICK_DIR if args.quick else Path(args.out)
        experiments = _experiments(args.experiments, args.quick, args.share_pi0)
        root.mkdir(parents=True, exist_ok=True)
        _held = _lock(root)  # noqa: F841 (held until this process exits)
        pi0, runs = plan(experiments, list(args.seeds), root)
        command = shlex.join(["iterppo", "sweep", *(sys.argv[1:] if argv is None else argv)])
        index = Index(root, command, args.quick, experiments, list(args.seeds), args.jobs)
    except (SweepError, OSError) as err:
        print(f"iterppo sweep: error: {err}", file=sys.stderr)
        return 2
    skipped = sum(j.action == "skipped" for j in runs)
    _say(
        f"sweep: {len(experiments)} experiment(s) x {len(args.seeds)} seed(s) in {root}"
        + (" (quick)" if args.quick else "")
        + f"; {skipped} finished run(s) skipped, {sum(j.action == 'resumed' for j in runs)} to resume, "
        f"{sum(j.status == 'pending' for j in pi0)} pi_0 to bootstrap; --jobs {args.jobs}"
    )
    try:
        with raise_on_interrupt():  # Ctrl-C or a terminated sweep stops its runs too, resumably
            execute(pi0, runs, args.jobs, index)
    except Interrupted as interrupted:
        print(
            f"iterppo sweep: interrupted ({interrupted.signal_name}); its runs were stopped resumably (index "
            f"{index.path}). Continue with the same command: {command}",
            file=sys.stderr,
        )
        return interrupted.exit_code
    bad = [j for j in pi0 + runs if j.status != "finished"]
    if bad:
        print(
            "iterppo sweep: error: not finished:\n  "
            + "\n  ".join(f"{j.label}: {j.status} (log {j.log})" for j in bad)
            + "\nfix the cause, then rerun the same command: finished runs are skipped, the others resume",
            file=sys.stderr,
        )
        return 1
    _say(f"sweep finished: {len(runs)} run(s); index {index.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
