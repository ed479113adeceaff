"""The sweep report's figures, drawn from small synthetic runs: one panel or small multiples, bands in [0, 1]."""

from __future__ import annotations

from pathlib import Path

from iterppo_lightning.experiments.report import (
    BAND_CAPTION,
    MAIN_EXPERIMENT,
    Run,
    mean_ci,
    reward_hacking_figure,
    success_figure,
)
from iterppo_lightning.utils.stats import bootstrap_mean_interval

TEN = [
    "critic_td",
    "filtered_bc",
    "fully_offline",
    "fully_online",
    "iterative_ppo",
    "kl_anchor_pi0",
    "myopic_ppo",
    "pessimistic_ensemble",
    "solver_grpo",
    "solver_rloo",
]


def make_run(name: str, seed: int, rates: list[float], estimate: bool = True) -> Run:
    records = []
    for k, rate in enumerate(rates):
        record = {"iteration": k, "success_rate": rate, "mean_return": 0.8 * rate}
        if estimate:
            record["ope"] = {"q_policy": 0.8 * rate + 0.1}
        records.append(record)
    return Run(name, seed, Path(f"runs/{name}/seed_{seed}"), True, records, {"success_rate": 0.02}, [100.0, 200.0])


def sweep_of(names: list[str], per_seed: list[list[float]]) -> dict[str, list[Run]]:
    return {
        name: [make_run(name, seed, rates, estimate=name != "filtered_bc") for seed, rates in enumerate(per_seed)]
        for name in names
    }


def visible_panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def band_bounds(ax) -> list[tuple[float, float]]:
    """(lowest, highest) y of every band (fill_between) drawn in the panel."""
    return [
        (float(c.get_paths()[0].vertices[:, 1].min()), float(c.get_paths()[0].vertices[:, 1].max()))
        for c in ax.collections
    ]


def legend_clear_of_panels(fig) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    return all(legend.y1 <= ax.get_window_extent(renderer).y0 for ax in visible_panels(fig))


def test_a_few_experiments_share_one_panel_with_bands_that_stay_in_zero_one():
    # Rates near 0 over three seeds: the Student-t interval of the last point goes below 0; the band may not.
    per_seed = [[0.0, 0.0], [0.0, 0.02], [0.05, 0.1]]
    assert mean_ci([0.0, 0.02, 0.1])[1] < 0.0
    fig = success_figure(sweep_of(["iterative_ppo", "filtered_bc", "oracle_critic"], per_seed))
    (ax,) = visible_panels(fig)
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_ylabel() == "true success rate" and BAND_CAPTION in ax.get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "iterative_ppo (n=3)",
        "filtered_bc (n=3)",
        "oracle_critic (n=3)",
    ]
    bounds = band_bounds(ax)
    assert len(bounds) == 3 and all(0.0 <= low <= high <= 1.0 for low, high in bounds)
    # The band at the last point (200 conversations) is the bootstrap interval of the seeds' last rates.
    vertices = ax.collections[0].get_paths()[0].vertices
    assert sorted({float(y) for x, y in vertices if x == 200.0}) == list(bootstrap_mean_interval([0.0, 0.02, 0.1]))
    assert legend_clear_of_panels(fig)


def test_ten_experiments_get_small_multiples_against_the_main_method():
    per_seed = [[0.3, 0.4], [0.2, 0.35], [0.25, 0.5]]
    fig = success_figure(sweep_of(TEN, per_seed))
    panels = visible_panels(fig)
    assert len(panels) == 10
    titles = [ax.get_title() for ax in panels]
    assert titles[0] == f"{MAIN_EXPERIMENT} (n=3)"  # the main method's own panel first
    assert sorted(t.split(" ")[0] for t in titles) == sorted(TEN)
    for ax in panels:
        assert ax.get_ylim() == (0.0, 1.0)
        assert all(0.0 <= low <= high <= 1.0 for low, high in band_bounds(ax))
    # Every other panel draws the main method behind its own experiment: two lines, the first grey and dashed.
    for ax in panels[1:]:
        reference, own = ax.get_lines()
        assert reference.get_linestyle() == "--" and list(reference.get_ydata()) == list(
            panels[0].get_lines()[0].get_ydata()
        )
    assert len(panels[0].get_lines()) == 1
    assert [ax.get_ylabel() for ax in panels] == [
        "true success rate",
        "",
        "",
        "",
        "",
        "true success rate",
        "",
        "",
        "",
        "",
    ]
    assert BAND_CAPTION in fig.get_suptitle()
    assert legend_clear_of_panels(fig)


def test_reward_hacking_has_one_panel_per_experiment_and_says_where_there_is_no_estimate():
    fig = reward_hacking_figure(sweep_of(TEN, [[0.3, 0.4], [0.2, 0.35]]))
    panels = visible_panels(fig)
    assert len(panels) == 10
    by_name = {ax.get_title().split(" ")[0]: ax for ax in panels}
    assert [t.get_text() for t in by_name["filtered_bc"].texts] == ["no off-policy estimate in these runs"]
    assert len(by_name["filtered_bc"].get_lines()) == 1 and len(by_name["iterative_ppo"].get_lines()) == 2
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "critic's estimate of the new policy (ope.q_policy)",
        "its true discounted return (mean_return)",
    ]
    assert BAND_CAPTION in fig.get_suptitle()
    assert legend_clear_of_panels(fig)
