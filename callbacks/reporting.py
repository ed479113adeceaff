"""Console table, metrics.jsonl, learning curve and summary.json for a run.

Files written under ``loop.run_dir`` (every write is atomic):

* ``metrics.jsonl`` - one JSON line per finished iteration (the full record);
  "return" is the true discounted return of the new policy on simulated
  customers, "ope" the critic's estimate of it from the logs alone;
* ``learning_curve.png`` - success rate of pi_0..pi_(k+1) with 95% Wilson intervals,
  the critic's off-policy estimate against the logged (and, simulated, the true)
  return, and the critic's and PPO's diagnostics per iteration (learning_curve.py
  says what each panel shows); redrawn after every iteration;
* ``summary.json`` - the run summary, written at the end: paths relative to the run folder
  (``final_policy``), and the best policy by evaluation success, ``best_policy`` (``pi_j``) with
  ``best_iteration`` = the iteration that made it (j - 1; null for pi_0).

Naming, here and everywhere in a run: policies are pi_0, pi_1, ...; iteration k collects with pi_k, fits Q_k
and trains pi_(k+1), which it saves in iteration_k/policy. Every JSON file is strict JSON: a number that is
undefined or was not measured is null, never NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from iterppo_lightning.utils.atomic_io import atomic_write_json, atomic_write_text, finite_json
from iterppo_lightning.utils.stats import as_number, lookup

from .base import IterationCallback
from .learning_curve import save_learning_curve

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
SUMMARY_FILE = "summary.json"

PHASES = ("collect", "critic", "policy", "evaluate")

# (header, width, record key or None for computed cells, number format)
COLUMNS: tuple[tuple[str, int, str | None, str], ...] = (
    ("iter", 4, "iteration", "d"),
    ("policy", 7, "policy", ""),
    ("success [95% CI]", 20, None, ""),
    ("turns", 5, "mean_turns", ".2f"),
    ("return", 6, "mean_return", ".3f"),
    ("ope", 5, "ope.q_policy", ".3f"),
    ("auroc", 5, "critic.val_auroc", ".3f"),
    ("brier", 5, "critic.val_brier", ".3f"),
    ("qcorr", 6, "critic_probe.within_state_corr", ".3f"),
    ("qpair", 5, "critic_probe.pairwise_acc", ".3f"),
    ("kl", 7, "ppo.kl", ".4f"),
    ("clip", 5, "ppo.clip_frac", ".3f"),
    ("entropy", 7, "ppo.entropy", ".3f"),
    ("sec collect/critic/policy/eval", 30, None, ""),
)


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; "-" when missing or not a number."""
    if spec == "":
        return "-" if value is None else str(value)
    number = as_number(value)
    if number is None:
        return "-"
    if spec == "d":
        return str(int(number))
    return format(number, spec)


def _fmt_success(record: dict) -> str:
    rate = _fmt(record.get("success_rate"), ".3f")
    ci = record.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{rate} [{_fmt(ci[0], '.3f')},{_fmt(ci[1], '.3f')}]"
    return f"{rate} [-]"


def _fmt_seconds(record: dict) -> str:
    cells = []
    for phase in PHASES:
        seconds = as_number(lookup(record, f"seconds.{phase}"))
        # Keep the cell short: tenths only matter for short phases.
        cells.append("-" if seconds is None else f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}")
    return "/".join(cells)


def _line(cells: list[str]) -> str:
    # Left-align text columns, right-align numbers, like a table row.
    parts = []
    for (_header, width, _, spec), cell in zip(COLUMNS, cells):
        parts.append(cell.ljust(width) if spec == "" else cell.rjust(width))
    return "  ".join(parts).rstrip()


def table_header() -> str:
    """The column header line matching ``table_row``."""
    return _line([header for header, *_ in COLUMNS])


def table_row(record: dict) -> str:
    """One aligned table line for an iteration record; missing values show "-"."""
    cells = []
    for header, _, key, spec in COLUMNS:
        if header.startswith("success"):
            cells.append(_fmt_success(record))
        elif header.startswith("sec"):
            cells.append(_fmt_seconds(record))
        else:
            cells.append(_fmt(lookup(record, key), spec))
    return _line(cells)


def _plain(obj: Any) -> Any:
    """``obj`` as strictly valid JSON data (NaN/inf as null); unknown objects become their ``repr``."""
    return finite_json(obj, lenient=True)


class ReportingCallback(IterationCallback):
    """Prints a per-iteration table and writes metrics.jsonl, the learning curve and summary.json.

    ``print_table=False`` silences the console; files are written either way.
    """

    def __init__(self, print_table: bool = True, console: Console | None = None) -> None:
        self.print_table = print_table
        self.console = console or Console()
        self._header_printed = False
        self._drawn: str | None = None  # the data of the curve this callback last drew

    # -- console ---------------------------------------------------------

    def _print(self, text: str | Text) -> None:
        if self.print_table:
            # soft_wrap: never fold a table line, whatever the terminal width.
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def _print_header(self) -> None:
        if not self._header_printed:
            self._print(Text(table_header(), style="bold"))
            self._header_printed = True

    # -- hooks -----------------------------------------------------------

    def on_run_start(self, loop: LoopView) -> None:
        logs = loop.logs
        plan = f"one iteration on logs {logs}" if logs else f"{loop.num_iterations} iteration(s)"
        self._print(Text(f"Iterative PPO: {plan}, run dir {loop.run_dir}", style="bold"))
        initial = loop.initial_eval
        if initial:
            self._print(
                f"pi_0 success {_fmt_success(initial)}  "
                f"(episodes {_fmt(initial.get('eval_episodes', initial.get('episodes')), 'd')})"
            )
        self._print_header()

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        records = self._records(loop, record)
        self._write_metrics(Path(loop.run_dir), records)
        self._print_header()
        self._print(table_row(record))
        self._draw_curve(loop, records)

    def on_run_end(self, loop: LoopView, summary: dict) -> None:
        history = list(loop.history)
        initial = loop.initial_eval
        final = history[-1] if history else {}
        candidates = ([("pi_0", initial)] if initial else []) + [
            (str(r.get("policy", f"pi_{i + 1}")), r) for i, r in enumerate(history)
        ]
        best_policy = self._best_named(candidates)
        # Iteration k trains pi_(k+1) from pi_k: best_iteration is the iteration that made best_policy (none for pi_0).
        best_iteration = None if best_policy is None or best_policy[1] is initial else best_policy[1].get("iteration")

        # Keys already in the summary (e.g. final_policy from the loop) win.
        filled = {
            "initial_success_rate": as_number(lookup(initial, "success_rate")),
            "final_success_rate": as_number(final.get("success_rate")),
            "final_ci95": final.get("ci95"),
            "iterations": len(history),
            "best_iteration": best_iteration,
            "best_policy": None if best_policy is None else best_policy[0],
            "best_success_rate": None if best_policy is None else as_number(best_policy[1].get("success_rate")),
        }
        for key, value in filled.items():
            summary.setdefault(key, value)

        run_dir = Path(loop.run_dir)
        atomic_write_json(run_dir / SUMMARY_FILE, _plain(summary))
        self._draw_curve(loop, history)
        self._print(
            f"done: {summary['iterations']} iteration(s); success "
            f"{_fmt(summary['initial_success_rate'], '.3f')} (pi_0) -> "
            f"{_fmt(summary['final_success_rate'], '.3f')} (final); best {summary['best_policy'] or '-'} "
            f"{_fmt(summary['best_success_rate'], '.3f')}; summary in {run_dir / SUMMARY_FILE}"
        )

    # -- helpers ---------------------------------------------------------

    @staticmethod
    def _records(loop: LoopView, record: dict) -> list[dict]:
        """Finished records including the current one (the loop appends it only after us)."""
        records = list(loop.history)
        same = records and (
            records[-1] is record
            or (record.get("iteration") is not None and records[-1].get("iteration") == record.get("iteration"))
        )
        if same:
            records[-1] = record
        else:
            records.append(record)
        return records

    @staticmethod
    def _best_named(candidates: list[tuple[str, dict]]) -> tuple[str, dict] | None:
        """Candidate with the highest success rate; the earliest wins ties."""
        best = None
        for name, record in candidates:
            rate = as_number(lookup(record, "success_rate"))
            if rate is not None and (best is None or rate > best[0]):
                best = (rate, name, record)
        return None if best is None else (best[1], best[2])

    @staticmethod
    def _write_metrics(run_dir: Path, records: list[dict]) -> None:
        # One line per finished iteration, rebuilt from the records and replaced atomically:
        # a kill mid-write never truncates a line, and a redone iteration never repeats one.
        lines = "".join(json.dumps(_plain(r), allow_nan=False) + "\n" for r in records)
        atomic_write_text(run_dir / METRICS_FILE, lines)

    def _draw_curve(self, loop: LoopView, records: list[dict]) -> None:
        """Redraw learning_curve.png unless it already shows these records; a plotting failure is reported, not
        raised. (The run's end would otherwise redraw what its last iteration drew: ~0.3 s for nothing.)"""
        path = Path(loop.run_dir) / CURVE_FILE
        data = json.dumps(_plain([loop.initial_eval, records]), sort_keys=True, default=str)
        if data == self._drawn and path.is_file():
            return
        try:
            save_learning_curve(path, loop.initial_eval, records)
            self._drawn = data
        except Exception as exc:  # the curve is cosmetic; never kill training for it
            if self.print_table:
                self.console.print(f"[yellow]learning curve not drawn: {exc!r}[/yellow]", highlight=False)
