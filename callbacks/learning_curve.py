"""The run's figure, ``learning_curve.png``: what a run's metrics.jsonl says, in up to three panels.

1. *Success rate per policy* (pi_0..pi_(k+1)) with each record's 95% Wilson
   interval over its evaluation episodes (``ci95``, always inside [0, 1]).
   A run without evaluation episodes (``model.loop.eval_episodes 0``, the
   setting for real logs) has no success rate; the panel then says so rather
   than stand empty.
2. *Value of each new policy* (when the run has an off-policy estimate): the
   critic Q_k's estimate of pi_(k+1) from the logged opening states
   (``ope.q_policy``), beside Q_k on the logged replies (``ope.q_logged``) and
   the discounted return the logged conversations really got
   (``ope.logged_return``); in a simulated run also pi_(k+1)'s true return on
   simulated customers (``mean_return``, same discount). For a log-only run
   this is the only outcome measure there is.
3. *Training diagnostics per iteration*: the critic's validation AUROC (and
   the critic probe's numbers when it ran) on the left axis; on the right,
   ``ppo.kl``, the PPO fit's KL from the policy to its reference (pi_k, or pi_0
   with ``model.policy.kl_anchor pi_0``), in nats per reply. It is the "k1"
   estimate: the sum over a sampled reply's tokens of log pi - log pi_ref,
   averaged over the fit's rollouts. Unbiased, but a single estimate can fall
   below 0 from sampling noise; it is plotted as logged, with 0 marked.

Legends sit below their panel, never over the data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iterppo_lightning.utils.atomic_io import atomic_path
from iterppo_lightning.utils.stats import as_number, lookup

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["learning_curve_figure", "save_learning_curve", "KL_AXIS_LABEL", "KL_LEGEND"]

KL_AXIS_LABEL = r"PPO KL($\pi\,\|\,\pi_{\mathrm{ref}}$), nats per reply"
KL_LEGEND = r"PPO KL($\pi\,\|\,\pi_{\mathrm{ref}}$), k1 estimate (mean over the fit's rollouts; can dip below 0)"
ITERATION_LABEL = "iteration k (critic Q_k, pi_k -> pi_k+1)"

# (record key, legend label, marker, colour) of the value panel; mean_return only exists in simulated runs.
VALUE_SERIES = (
    ("ope.q_policy", "critic's estimate of pi_k+1 from the logs (ope.q_policy)", "o", "C3"),
    ("ope.q_logged", "critic on the logged replies (ope.q_logged)", "s", "C1"),
    ("ope.logged_return", "return the logged conversations got (ope.logged_return)", "D", "C7"),
    ("mean_return", "pi_k+1's true return on simulated customers (mean_return)", "^", "C0"),
)
CRITIC_SERIES = (
    ("critic.val_auroc", "critic val AUROC", "s", "C1"),
    ("critic_probe.within_state_corr", "probe: within-state corr", "o", "C3"),
    ("critic_probe.pairwise_acc", "probe: pairwise acc", "D", "C4"),
)


def _policy_index(record: dict, position: int) -> int:
    """x position of the policy a record evaluates: ``pi_3`` -> 3."""
    match = re.fullmatch(r"pi_(\d+)", str(record.get("policy", "")))
    if match:
        return int(match.group(1))
    iteration = as_number(record.get("iteration"))
    return int(iteration) + 1 if iteration is not None else position + 1


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iteration, value) of every record that has a number at `key`."""
    xs, ys = [], []
    for i, r in enumerate(records):
        value = as_number(lookup(r, key))
        if value is not None:
            k = as_number(r.get("iteration"))
            xs.append(i if k is None else int(k))
            ys.append(value)
    return xs, ys


def _success_points(initial: dict | None, records: list[dict]) -> list[tuple[int, float, float, float, int | None]]:
    """(policy index, rate, low, high, episodes) of pi_0 (when evaluated) and every evaluated record."""
    points = ([(0, initial)] if initial else []) + [(_policy_index(r, i), r) for i, r in enumerate(records)]
    found = []
    for x, r in points:
        rate = as_number(r.get("success_rate"))
        if rate is None:
            continue
        ci = r.get("ci95")
        ci = ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
        low, high = as_number(ci[0]), as_number(ci[1])
        episodes = as_number(r.get("eval_episodes", r.get("episodes")))
        found.append(
            (
                x,
                rate,
                rate if low is None else min(low, rate),
                rate if high is None else max(high, rate),
                None if episodes is None else int(episodes),
            )
        )
    return found


def _legend_below(ax: Axes, handles: list | None = None, ncol: int = 2) -> None:
    """The panel's legend under its x label: inside, it would hide points wherever the series run."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22),
            ncol=min(ncol, len(handles)),
            fontsize="small",
            frameon=False,
        )


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize="medium", color="0.35")


def _success_panel(ax: Axes, initial: dict | None, records: list[dict], log_only: bool) -> None:
    points = _success_points(initial, records)
    # Rates live in [0, 1]; the small margin keeps a point at 0 or 1 from being cut in half by the frame.
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("success rate")
    ax.grid(alpha=0.3)
    if not points:
        ax.set_title("Evaluation success rate per policy")
        _note(
            ax,
            "no evaluation episodes (model.loop.eval_episodes 0): no success rate to plot"
            + ("\nthe value panel below is this run's outcome measure" if log_only else ""),
        )
        ax.set_xticks([])
        return
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    ax.errorbar(
        xs,
        ys,
        yerr=[[y - p[2] for y, p in zip(ys, points)], [p[3] - y for y, p in zip(ys, points)]],
        fmt="o-",
        color="C0",
        capsize=3,
    )
    episodes = sorted({p[4] for p in points if p[4] is not None})
    over = f" over {episodes[0]} episodes" if len(episodes) == 1 else " over each policy's evaluation episodes"
    ax.set_title(f"Evaluation success rate per policy (bars: 95% Wilson interval{over})", fontsize="medium")
    ax.set_xticks(xs, [f"pi_{x}" for x in xs])
    ax.set_xlabel("policy")


def _value_panel(ax: Axes, records: list[dict], log_only: bool) -> None:
    present = [(key, *rest, _series(records, key)) for key, *rest in VALUE_SERIES]
    present = [p for p in present if p[-1][0]]
    # Points of several series at one iteration sit side by side, so none hides another.
    width = 0.08
    offsets = [(i - (len(present) - 1) / 2) * width for i in range(len(present))]
    ticks: set[int] = set()
    values: list[float] = []
    for (_key, label, marker, color, (xs, ys)), offset in zip(present, offsets):
        ax.plot([x + offset for x in xs], ys, marker=marker, linestyle="-", color=color, label=label)
        ticks.update(xs)
        values.extend(ys)
    # A little room beyond [0, 1] so a point at 0 (no logged success) is not cut in half by the axis.
    ax.set_ylim(min(0.0, *values) - 0.03, max(1.0, *values) + 0.03)
    ax.set_xticks(sorted(ticks))
    ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    ax.set_xlabel(ITERATION_LABEL)
    ax.set_ylabel("discounted return")
    title = (
        "Log-only run (no evaluation episodes): the critic's value of the new policy\n"
        "vs the return the logged conversations got"
        if log_only
        else "The critic's value of each new policy vs its true return"
    )
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    _legend_below(ax, ncol=1)


def _training_panel(ax: Axes, records: list[dict]) -> None:
    ticks: set[int] = set()
    low, probed, drawn = 0.0, False, False
    for key, label, marker, color in CRITIC_SERIES:
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, marker=marker, linestyle="-", color=color, label=label)
            probed = probed or key.startswith("critic_probe")
            drawn = True
            ticks.update(xs)
            low = min([low, *ys])
    ax.set_ylim(low - 0.05 if low < 0 else 0, 1)
    ax.set_ylabel("critic: AUROC, probe" if probed else "critic val AUROC")
    ax.set_xlabel(ITERATION_LABEL)
    ax.set_title("Training diagnostics per iteration", fontsize="medium")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    kl_iters, kls = _series(records, "ppo.kl")
    if kl_iters:
        # KL lives on another scale than the critic's numbers, hence the second y axis; 0 stays in view
        # so the sign of the estimate is plain.
        kl_axis = ax.twinx()
        kl_axis.plot(kl_iters, kls, marker="^", linestyle="--", color="C2", label=KL_LEGEND)
        kl_axis.axhline(0.0, color="C2", linewidth=0.8, linestyle=":")
        kl_axis.annotate(
            "KL = 0",
            (1.0, 0.0),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize="x-small",
            color="C2",
        )
        top = max(kls)
        bottom = min(kls)
        span = max(top, 0.0) - min(bottom, 0.0) or 1.0
        kl_axis.set_ylim(min(bottom, 0.0) - 0.05 * span, max(top, 0.0) + 0.1 * span)
        kl_axis.set_ylabel(KL_AXIS_LABEL, color="C2")
        handles += kl_axis.get_legend_handles_labels()[0]
        ticks.update(kl_iters)
        drawn = True
    if not drawn:
        _note(ax, "no critic and no PPO fit in this run (e.g. filtered BC): nothing to plot")
    if ticks:
        ax.set_xticks(sorted(ticks))
    _legend_below(ax, handles, ncol=2)


def learning_curve_figure(initial: dict | None, records: list[dict]) -> Figure:
    """The figure for a run's pi_0 evaluation (None when there was none) and its iteration records."""
    # Imported here so importing the callbacks stays cheap; Figure plus
    # FigureCanvasAgg renders with Agg without switching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_value = any(_series(records, key)[0] for key, *_ in VALUE_SERIES[:3])
    log_only = not _success_points(initial, records)
    # A log-only run with an estimate leads with it; its empty success panel would only repeat the note.
    panels: list[str] = ([] if log_only and has_value else ["success"]) + (["value"] if has_value else [])
    panels.append("training")
    heights = {"success": 3.0, "value": 2.6, "training": 2.4}
    fig = Figure(figsize=(8.5, 1.0 + sum(heights[p] for p in panels)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, height_ratios=[heights[p] for p in panels], squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "success":
            _success_panel(ax, initial, records, log_only)
        elif panel == "value":
            _value_panel(ax, records, log_only)
        else:
            _training_panel(ax, records)
    return fig


def save_learning_curve(path: Path, initial: dict | None, records: list[dict[str, Any]]) -> None:
    """Draw the figure and write it to `path` atomically."""
    fig = learning_curve_figure(initial, records)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
