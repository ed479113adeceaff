"""`iterppo report`: the results of a sweep as markdown tables and plots.

    iterppo report --sweep runs/sweep --output docs/results.md

Reads OUT/sweep.json and every run it lists (metrics.jsonl, run_state.json,
config.yaml) and writes OUTPUT plus, next to it, OUTPUT-without-suffix/*.png
(docs/results.md -> docs/results/):

* a table with one row per experiment: final true success rate and the best
  iteration's, each as the mean over seeds with a Student-t 95% interval; pi_0's
  success; conversations collected; the run's recorded wall time; the critic's
  over-estimate of the final policy; how many runs had a fall in success beyond
  its interval (`drops`); then iterative_ppo against every other experiment,
  paired by seed (`ahead_by_seed`); then one row per run, with its largest fall;
* success_vs_conversations.png: true success rate against conversations
  collected (pi_0 at 0), mean over seeds with its 95% bootstrap band
  (`stats.bootstrap_mean_interval`: inside [0, 1] by construction), one line
  per experiment in one panel, or with more than four experiments one panel
  each with the main method (iterative_ppo) behind it for comparison;
* reward_hacking.png: per iteration, the critic's estimate of the new policy's
  discounted return from the logs (`ope.q_policy`) against the return it really
  got on simulated customers (`mean_return`, same discount), one panel per
  experiment, same bands. A gap that grows is PPO exploiting Q_k's errors.

Figures put their legends under the panels, never over data.

Only finished runs count in the statistics; the others are listed as missing.
Every file is written atomically. Exit codes: 0 written, 2 no usable sweep.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from iterppo_lightning.experiments.run_records import read_json, read_run_state, recorded_seconds
from iterppo_lightning.utils.atomic_io import atomic_path, atomic_write_text
from iterppo_lightning.utils.stats import as_number, bootstrap_mean_interval, lookup

__all__ = [
    "main",
    "t_quantile_975",
    "mean_ci",
    "load_run",
    "conversation_counts",
    "drops",
    "ahead_by_seed",
    "write_report",
]

# Two-sided 95% quantiles of Student's t, df = 1..30.
_T975 = (
    12.7062047,
    4.3026527,
    3.1824463,
    2.7764451,
    2.5705818,
    2.4469119,
    2.3646243,
    2.3060041,
    2.2621572,
    2.2281389,
    2.2009852,
    2.1788128,
    2.1603687,
    2.1447867,
    2.1314495,
    2.1199053,
    2.1098156,
    2.1009220,
    2.0930241,
    2.0859634,
    2.0796138,
    2.0738731,
    2.0686576,
    2.0638986,
    2.0595386,
    2.0555294,
    2.0518305,
    2.0484071,
    2.0452296,
    2.0422725,
)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table to 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963985
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): mean +- t(0.975, n-1) * s / sqrt(n); no interval for fewer than 2 values."""
    if not values:
        return None, None, None
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_ci(values: list[float], bounds: tuple[float, float] | None = None) -> str:
    """Mean [interval]; `bounds` clips the interval to the values' range (a rate's interval stays in [0, 1])."""
    mean, low, high = mean_ci(values)
    if mean is None:
        return "-"
    if low is None:
        return _fmt(mean)
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


RATE = (0.0, 1.0)
"""Success rates, and the probe's correlations' and accuracies' natural ranges, for `fmt_ci`."""


# -- reading runs -------------------------------------------------------------------------------------------


@dataclass
class Run:
    experiment: str
    seed: int
    run_dir: Path
    finished: bool
    records: list[dict] = field(default_factory=list)
    initial: dict | None = None
    conversations: list[float] = field(default_factory=list)
    """Conversations collected once iteration k's batch is in (x of pi_(k+1))."""
    seconds: float | None = None
    seconds_include_pi0: bool = False
    pi0_seconds: float | None = None

    @property
    def final(self) -> float | None:
        return as_number(self.records[-1].get("success_rate")) if self.records else None

    @property
    def best(self) -> float | None:
        rates = [as_number(r.get("success_rate")) for r in self.records]
        rates = [r for r in rates if r is not None]
        return max(rates) if rates else None

    @property
    def final_greedy(self) -> float | None:
        """The last policy's greedy success (model.loop.eval_greedy_also), on the same customers."""
        return as_number(self.records[-1].get("greedy_success_rate")) if self.records else None

    def probe(self, key: str, iteration: int = 0) -> float | None:
        """Q_k's critic-probe number `key` (e.g. within_state_corr), None when the run had no probe there."""
        if len(self.records) <= iteration:
            return None
        return as_number(lookup(self.records[iteration], f"critic_probe.{key}"))

    def evaluations(self) -> list[tuple[float, tuple[float, float] | None]]:
        """(success rate, its 95% interval or None) of pi_0 (when measured) and of every later policy, in order."""
        found = []
        for record in ([self.initial] if self.initial else []) + self.records:
            rate, ci = as_number(record.get("success_rate")), record.get("ci95")
            if rate is not None:
                interval = (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
                found.append((rate, interval))
        return found

    @property
    def ope_gap(self) -> float | None:
        """Critic's estimate minus the true discounted return, for the final policy."""
        if not self.records:
            return None
        q, truth = as_number(lookup(self.records[-1], "ope.q_policy")), as_number(self.records[-1].get("mean_return"))
        return None if q is None or truth is None else q - truth


@dataclass(frozen=True)
class Drops:
    """The falls in success from one evaluated policy to the next within a run (pi_k -> pi_k+1)."""

    largest: float
    """The largest fall (0.0 when the rate never fell)."""
    beyond_interval: int
    """How many falls exceed their interval: sqrt(h_k^2 + h_k+1^2), h the half-widths of the two 95% intervals,
    the interval of a difference of two independent estimates (conservative here: the customers are shared)."""


def drops(evaluations: list[tuple[float, tuple[float, float] | None]]) -> Drops | None:
    """`Run.evaluations()` -> its falls; None with fewer than two evaluations. A fall whose two evaluations lack
    intervals is measured but never counted as beyond one."""
    if len(evaluations) < 2:
        return None
    largest, beyond = 0.0, 0
    for (before, ci_before), (after, ci_after) in zip(evaluations, evaluations[1:]):
        fall = before - after
        largest = max(largest, fall)
        if fall > 0 and ci_before is not None and ci_after is not None:
            half = math.hypot((ci_before[1] - ci_before[0]) / 2, (ci_after[1] - ci_after[0]) / 2)
            beyond += fall > half
    return Drops(largest, beyond)


def ahead_by_seed(main: list[Run], other: list[Run]) -> list[float]:
    """Per seed both ran: the main experiment's final success minus the other's (the same customers per seed)."""
    finals = {r.seed: r.final for r in main if r.final is not None}
    return [
        finals[r.seed] - r.final
        for r in sorted(other, key=lambda r: r.seed)
        if r.seed in finals and r.final is not None
    ]


def conversation_counts(records: list[dict], episodes_per_iteration: int | None) -> list[float]:
    """Cumulative conversations collected per iteration record.

    `conversations_collected` when the record has it; else the running sum of the
    record's own `collect.episodes`; else (k+1) x the config's episodes_per_iteration.
    """
    counts, total = [], 0.0
    for k, record in enumerate(records):
        given = as_number(record.get("conversations_collected"))
        episodes = as_number(lookup(record, "collect.episodes"))
        if given is not None:
            total = given
        elif episodes is not None:
            total += episodes
        elif episodes_per_iteration is not None:
            total = (k + 1) * float(episodes_per_iteration)
        else:
            total = math.nan
        counts.append(total)
    return counts


def load_run(experiment: str, seed: int, run_dir: Path, entry: dict | None = None) -> Run:
    state = read_run_state(run_dir) or {}
    run = Run(experiment, seed, run_dir, bool(state.get("finished")))
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        run.records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    run.initial = state.get("initial_eval")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except OSError:
        config = {}
    run.conversations = conversation_counts(run.records, lookup(config, "model.loop.episodes_per_iteration"))
    entry = entry or {}
    if entry.get("seconds") is not None:
        run.seconds, run.seconds_include_pi0 = float(entry["seconds"]), bool(entry.get("seconds_include_pi0"))
    else:  # a sweep.json older than its runs: read the runs' own record
        run.seconds, run.seconds_include_pi0 = recorded_seconds(run_dir)
    run.pi0_seconds = as_number(entry.get("pi0_seconds"))
    return run


# -- plots ------------------------------------------------------------------------------------------------

BAND_CAPTION = "bands: 95% percentile bootstrap of the mean over seeds"
"""How every band in the report's figures is made (`stats.bootstrap_mean_interval`): it never leaves the
seeds' own range, so a rate's band stays inside [0, 1] without clipping; no band with one seed."""
MAIN_EXPERIMENT = "iterative_ppo"
"""The method every other experiment is drawn against when there are too many for one panel."""
ONE_PANEL_AT_MOST = 4
"""Up to this many experiments share one panel; more get one panel each (small multiples)."""


def _series(runs: list[Run], points) -> tuple[list[float], list[float], list[float | None], list[float | None]]:
    """Per point index j: mean x, mean y and its bootstrap band (low, high) over the runs that have point j."""
    per_run = [points(r) for r in runs]
    xs, ys, lows, highs = [], [], [], []
    for j in range(max((len(p) for p in per_run), default=0)):
        have = [
            p[j]
            for p in per_run
            if j < len(p) and p[j][1] is not None and p[j][0] is not None and not math.isnan(p[j][0])
        ]
        if not have:
            continue
        values = [y for _, y in have]
        band = bootstrap_mean_interval(values)
        xs.append(sum(x for x, _ in have) / len(have))
        ys.append(sum(values) / len(values))
        lows.append(None if band is None else band[0])
        highs.append(None if band is None else band[1])
    return xs, ys, lows, highs


def _band(ax, xs, ys, lows, highs, color, **line) -> None:
    ax.plot(xs, ys, color=color, **line)
    ci = [(x, lo, hi) for x, lo, hi in zip(xs, lows, highs) if lo is not None]
    if len(ci) >= 2:
        ax.fill_between(
            [c[0] for c in ci], [c[1] for c in ci], [c[2] for c in ci], color=color, alpha=0.15, linewidth=0
        )


def _success_points(run: Run) -> list[tuple[float, float | None]]:
    start = [(0.0, as_number(lookup(run.initial, "success_rate")))] if run.initial else []
    return start + [(x, as_number(r.get("success_rate"))) for x, r in zip(run.conversations, run.records)]


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(max(n, 1) / cols), cols


def _label_outer(axes, n: int, cols: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on the left column and on each panel with no panel below it, not on every panel."""
    for i, ax in enumerate(axes[:n]):
        if i % cols == 0:
            ax.set_ylabel(ylabel)
        if i + cols >= n:
            ax.set_xlabel(xlabel)


def _legend_below(fig, handles: list, ncol: int) -> None:
    """One legend for the whole figure, under the panels: inside a panel it would cover data."""
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=max(1, min(ncol, len(handles))), frameon=False)


def success_figure(experiments: dict[str, list[Run]]):
    """True success rate against conversations collected, mean over seeds with its bootstrap band.

    Up to ONE_PANEL_AT_MOST experiments share one panel. With more, each gets its own panel (same axes),
    with the main method (MAIN_EXPERIMENT, else the first) drawn in grey behind it for comparison.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = list(experiments)
    title = "True success rate vs conversations collected (x = 0: pi_0)"
    ylabel = "true success rate"
    if len(names) <= ONE_PANEL_AT_MOST:
        fig = Figure(figsize=(8, 5.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for i, name in enumerate(names):
            xs, ys, lows, highs = _series(experiments[name], _success_points)
            _band(
                ax,
                xs,
                ys,
                lows,
                highs,
                f"C{i % 10}",
                marker="o",
                markersize=3,
                label=f"{name} (n={len(experiments[name])})",
            )
        ax.set_xlabel("conversations collected")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}\nmean over seeds; {BAND_CAPTION}", fontsize="medium")
        _legend_below(fig, ax.get_legend_handles_labels()[0], ncol=len(names))
        return fig

    main = MAIN_EXPERIMENT if MAIN_EXPERIMENT in experiments else names[0]
    names = [main] + [name for name in names if name != main]  # the main method's own panel first
    reference = _series(experiments[main], _success_points)
    rows, cols = _grid(len(names), 5)
    fig = Figure(figsize=(3.2 * cols, 2.7 * rows + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax, name in zip(axes.ravel(), names):
        if name != main:
            _band(ax, *reference, "0.6", linestyle="--", linewidth=1)
        color = "C3" if name == main else "C0"
        _band(ax, *_series(experiments[name], _success_points), color, marker="o", markersize=3)
        ax.set_title(f"{name} (n={len(experiments[name])})", fontsize="medium")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=True)  # shared x: keep the numbers under every panel, labels only outside
    for ax in axes.ravel()[len(names) :]:
        ax.set_visible(False)
    _label_outer(axes.ravel(), len(names), cols, "conversations collected", ylabel)
    fig.suptitle(f"{title}; mean over seeds, {BAND_CAPTION}")
    _legend_below(
        fig,
        [
            Line2D([], [], color="C0", marker="o", markersize=3, label="the panel's experiment"),
            Line2D([], [], color="C3", marker="o", markersize=3, label=f"{main} (its own panel)"),
            Line2D([], [], color="0.6", linestyle="--", label=f"{main}, for comparison"),
        ],
        ncol=3,
    )
    return fig


def plot_success(path: Path, experiments: dict[str, list[Run]]) -> None:
    fig = success_figure(experiments)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


REWARD_SERIES = (
    ("ope.q_policy", "critic's estimate of the new policy (ope.q_policy)", "C3", "--"),
    ("mean_return", "its true discounted return (mean_return)", "C0", "-"),
)


def reward_hacking_figure(experiments: dict[str, list[Run]]):
    """Per experiment, the critic's estimate of each new policy's discounted return against the true one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    rows, cols = _grid(len(experiments), 3 if len(experiments) <= 6 else 5)
    fig = Figure(figsize=((4.2 if cols <= 3 else 3.2) * cols, 3.0 * rows + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    drawn: set[str] = set()
    for ax, (name, runs) in zip(axes, experiments.items()):
        values: list[float] = []
        drawn_here: set[str] = set()
        for key, _label, color, style in REWARD_SERIES:
            xs, ys, lows, highs = _series(
                runs, lambda r, key=key: [(float(k), as_number(lookup(rec, key))) for k, rec in enumerate(r.records)]
            )
            if all(y is None or math.isnan(y) for y in ys):  # e.g. no learned critic (filtered BC, oracle): no estimate
                continue
            drawn_here.add(key)
            _band(ax, xs, ys, lows, highs, color, linestyle=style, marker="o", markersize=3)
            values += [v for v in (*ys, *lows, *highs) if v is not None]
        if "ope.q_policy" not in drawn_here:
            ax.text(
                0.5,
                0.95,
                "no off-policy estimate in these runs",
                transform=ax.transAxes,
                ha="center",
                va="top",
                color="0.4",
            )
        ax.set_title(f"{name} (n={len(runs)})", fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Returns of this reward lie in [0, 1]; a critic's estimate may not, and is then kept in view.
        ax.set_ylim(min([0.0, *values]), max([1.0, *values]))
        ax.grid(alpha=0.3)
        drawn |= drawn_here
    for ax in axes[len(experiments) :]:
        ax.set_visible(False)
    _label_outer(axes, len(experiments), cols, "iteration k (policy pi_k+1)", "discounted return")
    fig.suptitle(
        f"Reward hacking: the critic's value of each new policy vs its true value\nmean over seeds; {BAND_CAPTION}",
        fontsize="medium",
    )
    _legend_below(
        fig,
        [
            Line2D([], [], color=color, linestyle=style, marker="o", markersize=3, label=label)
            for key, label, color, style in REWARD_SERIES
            if key in drawn
        ],
        ncol=2,
    )
    return fig


def plot_reward_hacking(path: Path, experiments: dict[str, list[Run]]) -> None:
    fig = reward_hacking_figure(experiments)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)


# -- markdown -----------------------------------------------------------------------------------------------


def _minutes(values: list[float]) -> str:
    return "-" if not values else f"{sum(values) / len(values) / 60:.1f}"


def _ahead_table(experiments: dict[str, list[Run]]) -> list[str]:
    """MAIN_EXPERIMENT against every other experiment, seed by seed: the paired view of "better on every seed"."""
    if MAIN_EXPERIMENT not in experiments or len(experiments) < 2:
        return []
    main = experiments[MAIN_EXPERIMENT]
    lines = [
        "",
        f"{MAIN_EXPERIMENT} against each other experiment, paired by seed (same pi_0, same evaluation customers): its "
        "final success minus the other's, the mean over the seeds both ran with a Student-t 95% interval, and on "
        f"how many of those seeds {MAIN_EXPERIMENT} is ahead.",
        "",
        f"| experiment | {MAIN_EXPERIMENT} ahead by (sampled) | seeds ahead (sampled) | {MAIN_EXPERIMENT} ahead by "
        "(greedy) | seeds ahead (greedy) |",
        "|---|---|---|---|---|",
    ]
    greedy_main = {r.seed: r.final_greedy for r in main if r.final_greedy is not None}
    for name, runs in experiments.items():
        if name == MAIN_EXPERIMENT:
            continue
        sampled = ahead_by_seed(main, runs)
        greedy = [
            greedy_main[r.seed] - r.final_greedy for r in runs if r.seed in greedy_main and r.final_greedy is not None
        ]
        lines.append(
            f"| {name} | {fmt_ci(sampled, (-1.0, 1.0))} | {sum(d > 0 for d in sampled)} of {len(sampled)} | "
            f"{fmt_ci(greedy, (-1.0, 1.0))} | {f'{sum(d > 0 for d in greedy)} of {len(greedy)}' if greedy else '-'} |"
        )
    return lines


def write_report(sweep_dir: Path, output: Path, command: str, notes: Path | None = None) -> dict:
    index = read_json(sweep_dir / "sweep.json")
    if not isinstance(index, dict) or "runs" not in index:
        raise FileNotFoundError(
            f"{str(sweep_dir)!r} holds no sweep ({sweep_dir / 'sweep.json'} is missing or unreadable)"
        )
    names = [e["name"] for e in index.get("experiments", [])]
    experiments: dict[str, list[Run]] = {name: [] for name in names}
    missing: list[str] = []
    for entry in index["runs"]:
        run = load_run(entry["experiment"], entry["seed"], Path(entry["run_dir"]), entry)
        if run.finished and run.records:
            experiments.setdefault(run.experiment, []).append(run)
        else:
            missing.append(
                f"{entry['experiment']} seed {entry['seed']} ({entry.get('status', '?')}, {entry['run_dir']})"
            )
    experiments = {name: runs for name, runs in experiments.items() if runs}

    figures = output.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    plot_success(figures / "success_vs_conversations.png", experiments)
    plot_reward_hacking(figures / "reward_hacking.png", experiments)
    rel = figures.name

    pi0_seconds = sorted({r.pi0_seconds for runs in experiments.values() for r in runs if r.pi0_seconds is not None})
    lines = [
        "# Ablation results",
        "",
        f"Generated by `{command}` from the sweep made by:",
        "",
        f"    {index.get('command', '(unknown command)')}",
        "",
    ]
    if index.get("quick"):
        scale = ", ".join(f"{k} / {v}" for k, v in (index.get("quick_scale") or {}).items())
        lines += [
            "**QUICK SWEEP (`--quick true`): every experiment scaled down (" + scale + ").** "
            "It checks that the pipeline runs end to end; its numbers are not results.",
            "",
        ]
    lines += [
        "Each cell is the mean over seeds with a Student-t 95% interval (mean +- t(0.975, n-1) s/sqrt(n)); "
        "no interval with one seed. *Final* is the last policy's true success rate on the run's simulated "
        "evaluation customers; *best* the best iteration's (chosen on those same customers, so it is optimistic). "
        "*Conversations* counts what the run "
        "collected with its own policies (pi_0's imagined conversations not included). *Wall* is the sum of the phase "
        "times the run recorded (collect, critic, policy, evaluate), in minutes"
        + (
            "; it excludes the shared pi_0, bootstrapped once per seed in "
            + ", ".join(f"{s / 60:.1f}" for s in pi0_seconds)
            + " min"
            if pi0_seconds
            else ""
        )
        + ". *OPE gap* is the critic's estimate of the final policy's discounted return minus its true value (> 0: "
        "over-estimate). *Greedy* is the final policy's success with greedy decoding on the same customers "
        "(`model.loop.eval_greedy_also`). *Q_0 corr* and *Q_0 pairs* are the critic probe's `within_state_corr` and "
        "`pairwise_acc` for the first critic (`model.loop.critic_probe`): how well Q_0 ranks replies at one state "
        "against the simulator's ground truth (docs/critic.md). Intervals are clipped to the quantity's range "
        "(rates and accuracies to [0, 1], correlations and the OPE gap to [-1, 1]); '-' where a run did not "
        "measure it. *Drops beyond CI* counts the runs in which some policy's success fell below the one "
        "before it (pi_0 included) by more than the 95% interval of the difference, sqrt(h1^2 + h2^2) with h1, h2 "
        "the half-widths of the two evaluations' Wilson intervals; the runs table gives each run's largest fall.",
        "",
        "| experiment | seeds | pi_0 success | final success | greedy | best-iteration success | Q_0 corr | Q_0 pairs "
        "| conversations | wall (min) | OPE gap | drops beyond CI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = {}
    for name, runs in experiments.items():
        finals = [r.final for r in runs if r.final is not None]
        bests = [r.best for r in runs if r.best is not None]
        initials = [v for v in (as_number(lookup(r.initial, "success_rate")) for r in runs) if v is not None]
        conversations = [r.conversations[-1] for r in runs if r.conversations]
        seconds = [r.seconds for r in runs if r.seconds is not None]
        gaps = [g for g in (r.ope_gap for r in runs) if g is not None]
        greedy = [g for g in (r.final_greedy for r in runs) if g is not None]
        corr = [c for c in (r.probe("within_state_corr") for r in runs) if c is not None]
        pairs = [p for p in (r.probe("pairwise_acc") for r in runs) if p is not None]
        falls = [d for d in (drops(r.evaluations()) for r in runs) if d is not None]
        summary[name] = {"final": finals, "best": bests, "seconds": seconds, "greedy": greedy}
        lines.append(
            f"| {name} | {len(runs)} | {fmt_ci(initials, RATE)} | {fmt_ci(finals, RATE)} | {fmt_ci(greedy, RATE)} | "
            f"{fmt_ci(bests, RATE)} | {fmt_ci(corr, (-1.0, 1.0))} | {fmt_ci(pairs, RATE)} | "
            f"{_fmt(sum(conversations) / len(conversations), '.0f') if conversations else '-'} | "
            f"{_minutes(seconds)} | {fmt_ci(gaps, (-1.0, 1.0))} | "
            f"{f'{sum(d.beyond_interval > 0 for d in falls)} of {len(falls)}' if falls else '-'} |"
        )
    lines += _ahead_table(experiments)
    lines += [
        "",
        f"![success rate vs conversations collected]({rel}/success_vs_conversations.png)",
        "",
        "The figures' bands are 95% percentile-bootstrap intervals of the mean over seeds (10,000 resamples, "
        "seeded): a band never leaves the seeds' own range, so a rate's band stays inside [0, 1], and with few "
        "seeds it is narrower than the tables' Student-t interval; no band with one seed."
        + (
            f" With more than {ONE_PANEL_AT_MOST} experiments each gets its own panel, with "
            f"{MAIN_EXPERIMENT if MAIN_EXPERIMENT in experiments else next(iter(experiments), '')} in grey behind it."
            if len(experiments) > ONE_PANEL_AT_MOST
            else ""
        ),
        "",
        "Reward hacking: per iteration, the critic Q_k's estimate of the new policy's discounted return from the "
        "logged opening states (`ope.q_policy`), against the return the policy really got on simulated customers "
        "(`mean_return`, the same discount; the success rate itself is undiscounted and not comparable).",
        "",
        f"![critic estimate vs true return]({rel}/reward_hacking.png)",
        "",
        "## Runs",
        "",
        "| experiment | seed | iterations | pi_0 success | final success | greedy | best success | largest drop "
        "| Q_0 corr | Q_0 pairs | conversations | wall (min) | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in experiments.items():
        for r in sorted(runs, key=lambda r: r.seed):
            fall = drops(r.evaluations())
            fall_cell = "-" if fall is None else _fmt(fall.largest) + (" (beyond CI)" if fall.beyond_interval else "")
            lines.append(
                f"| {name} | {r.seed} | {len(r.records)} | {_fmt(as_number(lookup(r.initial, 'success_rate')))} | "
                f"{_fmt(r.final)} | {_fmt(r.final_greedy)} | {_fmt(r.best)} | {fall_cell} | "
                f"{_fmt(r.probe('within_state_corr'))} | "
                f"{_fmt(r.probe('pairwise_acc'))} | {_fmt(r.conversations[-1] if r.conversations else None, '.0f')} | "
                f"{_fmt(None if r.seconds is None else r.seconds / 60, '.1f')}"
                f"{' (incl. pi_0)' if r.seconds_include_pi0 else ''} | `{r.run_dir}` |"
            )
    if missing:
        lines += ["", "Not finished (left out of every number above):", ""] + [f"- {m}" for m in missing]
    if notes is not None:  # conclusions are written by people, from the numbers above; included verbatim
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    atomic_write_text(output, "\n".join(lines) + "\n")
    return {
        "output": str(output),
        "figures": str(figures),
        "experiments": {k: len(v) for k, v in experiments.items()},
        "missing": len(missing),
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="iterppo report", description="Markdown tables and plots of a sweep (iterppo sweep).", default_env=False
    )
    parser.add_argument(
        "--sweep", type=str, required=True, help="the sweep folder (holds sweep.json); OUT/quick for a quick sweep"
    )
    parser.add_argument(
        "--output",
        type=str,
        default="",
        help="the markdown file (default SWEEP/results.md); plots go to OUTPUT without its suffix/",
    )
    parser.add_argument(
        "--notes",
        type=str,
        default="",
        help="a markdown file appended verbatim (the conclusions drawn from these numbers)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    sweep_dir = Path(args.sweep)
    output = Path(args.output) if args.output else sweep_dir / "results.md"
    command = shlex.join(
        ["iterppo", "report", "--sweep", args.sweep, "--output", str(output)]
        + (["--notes", args.notes] if args.notes else [])
    )
    try:
        if args.notes and not Path(args.notes).is_file():
            raise FileNotFoundError(f"--notes {args.notes}: no such file")
        result = write_report(sweep_dir, output, command, Path(args.notes) if args.notes else None)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"iterppo report: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
