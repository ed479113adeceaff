"""`iterppo sweep` and `iterppo report` end to end, on 2 tiny experiments x 2 seeds with --jobs 2.

One module fixture runs the sweep three times, the way a user would after a crash:
1. one experiment, one seed, with ITERPPO_FAILPOINT=policy.step@2 inherited by `fit`: the run
   is SIGKILLed in iteration 1's PPO (its shared pi_0's bootstrap runs no PPO, so it finishes);
2. the full sweep (2 experiments x 2 seeds, --jobs 2): the killed run is resumed, the seed-0
   pi_0 reused, the rest run new;
3. the same command again: everything is finished, nothing runs.
Then a plain `fit` of the killed (experiment, seed), without the shared pi_0 and without a kill,
must give the same metrics, and `iterppo report` must print the hand-computed numbers.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cli_helpers import run_cli, run_inprocess, tree_fingerprint

TINY = """\
# A tiny experiment: seconds per run, and a customer easy enough that some conversations succeed.
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
model:
  critic:
    lr: 0.001{critic}
  policy:
    lr: 0.0003
    ppo_epochs: 1
    minibatches: 1
    kl_coef: 0.05
    max_new_tokens: 12
  environment:
    price_sensitive_prob: 0.0
    min_patience: 6
    max_patience: 8
  bootstrap:
    episodes: 200
    curriculum_steps: 60
    epochs: 1
    model:
      n_layer: 1
      n_embd: 32
      n_head: 2
  loop:
    iterations: 2
    episodes_per_iteration: 16
    eval_episodes: 32
    critic_epochs: 1
data:
  critic_batch_size: 16
  policy_batch_size: 8
  policy_batches: 1
"""
EXPERIMENTS = {"mc": "", "td": "\n    target: td\n    td_rounds: 1"}
SEEDS = (0, 1)
ITERATIONS, EPISODES = 2, 16
T975_DF1 = 12.7062047  # Student t, 0.975 quantile, 1 degree of freedom (2 seeds)


def sweep_cmd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # A process of its own running the checkout under test (the runs it starts are `python -m` processes).
    return run_cli("sweep", *args, env=env, timeout=600)


def metrics_without_times(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")
    return records


def index(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    configs = []
    for name, critic in EXPERIMENTS.items():
        path = root / "experiments" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(TINY.format(critic=critic))
        configs.append(str(path))
    out = root / "out"
    args = ["--experiments", *configs, "--seeds", *map(str, SEEDS), "--out", str(out), "--jobs", "2"]

    killed = sweep_cmd(
        "--experiments", configs[0], "--seeds", "0", "--out", str(out), env={"ITERPPO_FAILPOINT": "policy.step@2"}
    )
    killed_index = index(out)
    done = sweep_cmd(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    done_index = index(out)
    logs = {p: p.read_bytes() for p in out.rglob("*.log")}
    runs = {f"{e}/seed_{s}": tree_fingerprint(out / e / f"seed_{s}") for e in EXPERIMENTS for s in SEEDS}
    again = sweep_cmd(*args)
    return SimpleNamespace(
        root=root,
        out=out,
        args=args,
        configs=configs,
        killed=killed,
        killed_index=killed_index,
        done=done,
        done_index=done_index,
        logs=logs,
        runs=runs,
        again=again,
    )


def test_a_killed_run_is_reported_with_its_log(sweep):
    assert sweep.killed.returncode == 1, sweep.killed.stderr[-3000:]
    [run] = sweep.killed_index["runs"]
    assert (run["experiment"], run["seed"], run["status"], run["returncode"]) == ("mc", 0, "failed", -9)
    assert run["iterations"] == 1  # killed in iteration 1: iteration 0 is committed
    assert (
        "not finished" in sweep.killed.stderr
        and "mc seed 0" in sweep.killed.stderr
        and run["log"] in sweep.killed.stderr
    )
    [pi0] = sweep.killed_index["pi0"]
    assert pi0["status"] == "finished" and pi0["seconds"] > 0


def test_the_full_sweep_resumes_the_killed_run_and_finishes(sweep):
    runs = sweep.done_index["runs"]
    assert len(runs) == len(EXPERIMENTS) * len(SEEDS)
    assert {r["status"] for r in runs} == {"finished"}
    assert {(r["experiment"], r["seed"]): r["action"] for r in runs} == {
        ("mc", 0): "resumed",
        ("td", 0): "new",
        ("mc", 1): "new",
        ("td", 1): "new",
    }
    assert sweep.done_index["seeds"] == list(SEEDS)
    assert [e["name"] for e in sweep.done_index["experiments"]] == list(EXPERIMENTS)
    # One pi_0 per seed, shared by both experiments (same pi_0 recipe); seed 0's was made by the first sweep.
    assert {p["seed"]: p["action"] for p in sweep.done_index["pi0"]} == {0: "existing", 1: "new"}
    assert all(sorted(p["experiments"]) == sorted(EXPERIMENTS) for p in sweep.done_index["pi0"])
    assert "--jobs 2" in sweep.done.stdout
    for r in runs:
        run_dir = Path(r["run_dir"])
        assert run_dir == sweep.out / r["experiment"] / f"seed_{r['seed']}"
        state = json.loads((run_dir / "run_state.json").read_text())
        assert state["finished"] and state["completed_iterations"] == ITERATIONS and state["seed"] == r["seed"]
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == ITERATIONS
        # The log sits beside the run dir with one header line per attempt; a resume says so.
        assert Path(r["log"]) == run_dir.parent / f"seed_{r['seed']}.log"
        attempts = [line for line in Path(r["log"]).read_text().splitlines() if line.startswith("=== ")]
        assert "new: " in attempts[0] and "--resume" not in attempts[0]
        if r["action"] == "resumed":
            assert len(attempts) == 2 and "resumed: " in attempts[1] and attempts[1].endswith("--resume true")
        else:
            assert len(attempts) == 1
        # The recorded time: the run's own phase times (pi_0 was shared, so not in them).
        expected = sum(v for rec in state["history"] for v in rec["seconds"].values())
        assert r["seconds"] == pytest.approx(expected) and r["seconds_include_pi0"] is False
        assert r["pi0"] and (Path(r["pi0"]) / "policy").is_dir() and r["pi0_seconds"] > 0
        assert r["process_seconds"] > 0
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["seed_everything"] == r["seed"] and config["model"]["policy_init"] == str(
            Path(r["pi0"]) / "policy"
        )


def test_a_finished_sweep_runs_nothing_again(sweep):
    assert sweep.again.returncode == 0, sweep.again.stderr[-3000:]
    assert "start " not in sweep.again.stdout
    again = index(sweep.out)
    assert {r["action"] for r in again["runs"]} == {"skipped"}
    for before, after in zip(sweep.done_index["runs"], again["runs"]):
        assert after["seconds"] == before["seconds"] and after["process_seconds"] == before["process_seconds"]
    assert {p: p.read_bytes() for p in sweep.out.rglob("*.log")} == sweep.logs  # no attempt was logged
    assert {k: tree_fingerprint(sweep.out / k) for k in sweep.runs} == sweep.runs


def test_a_shared_pi0_and_a_resumed_kill_give_the_plain_fit(sweep):
    run_dir = sweep.root / "plain"
    proc = run_cli(
        "fit", "--config", sweep.configs[0], "--seed_everything", "0", "--run_dir", str(run_dir), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics_without_times(run_dir) == metrics_without_times(sweep.out / "mc" / "seed_0")


def test_report_tables_and_plots(sweep, capsys):
    output = sweep.root / "docs" / "results.md"
    res = run_inprocess(capsys, "report", "--sweep", str(sweep.out), "--output", str(output))
    assert res.returncode == 0, res.stderr
    text = output.read_text()
    assert f"iterppo report --sweep {sweep.out} --output {output}" in text.splitlines()[2]
    assert "iterppo sweep --experiments" in text
    for name in EXPERIMENTS:
        runs = [sweep.out / name / f"seed_{s}" for s in SEEDS]
        records = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
        finals = [rec[-1]["success_rate"] for rec in records]
        bests = [max(x["success_rate"] for x in rec) for rec in records]

        def cell(values):  # a rate's interval is clipped to [0, 1]
            mean, half = statistics.mean(values), T975_DF1 * statistics.stdev(values) / math.sqrt(len(values))
            return f"{mean:.3f} [{max(mean - half, 0.0):.3f}, {min(mean + half, 1.0):.3f}]"

        seconds = [sum(v for x in rec for v in x["seconds"].values()) for rec in records]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | {len(SEEDS)} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == cell(finals)
        assert cells[4] == "-"  # no greedy evaluation asked for
        assert cells[5] == cell(bests)
        assert cells[6] == cells[7] == "-"  # no critic probe
        assert cells[8] == str(ITERATIONS * EPISODES)  # conversations collected (from collect.episodes)
        assert cells[9] == f"{statistics.mean(seconds) / 60:.1f}"
        # Drops: pi_0 -> pi_1 -> pi_2, each fall against the interval of the difference of two Wilson intervals.
        beyond_runs = 0
        for run_dir, rec in zip(runs, records):
            initial = json.loads((run_dir / "run_state.json").read_text())["initial_eval"]
            chain = [initial] + rec
            falls = [
                a["success_rate"] - b["success_rate"]
                > math.sqrt(((a["ci95"][1] - a["ci95"][0]) / 2) ** 2 + ((b["ci95"][1] - b["ci95"][0]) / 2) ** 2)
                for a, b in zip(chain, chain[1:])
                if a["success_rate"] > b["success_rate"]
            ]
            beyond_runs += any(falls)
        assert cells[11] == f"{beyond_runs} of {len(SEEDS)}"
    for png in ("success_vs_conversations.png", "reward_hacking.png"):
        data = (output.parent / "results" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "(results/success_vs_conversations.png)" in text and "Not finished" not in text
    assert "bands are 95% percentile-bootstrap intervals of the mean over seeds" in text  # the figures' caption


def test_report_compares_the_main_experiment_with_every_other_seed_by_seed(sweep, capsys, tmp_path, monkeypatch):
    from iterppo_lightning.experiments import report

    output = tmp_path / "paired.md"
    monkeypatch.setattr(report, "MAIN_EXPERIMENT", "mc")  # the tiny sweep's stand-in for iterative_ppo
    res = run_inprocess(capsys, "report", "--sweep", str(sweep.out), "--output", str(output))
    assert res.returncode == 0, res.stderr
    finals = {
        (name, seed): json.loads((sweep.out / name / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()[-1])[
            "success_rate"
        ]
        for name in EXPERIMENTS
        for seed in SEEDS
    }
    ahead = [finals["mc", s] - finals["td", s] for s in SEEDS]
    lines = output.read_text().splitlines()
    header = (
        "| experiment | mc ahead by (sampled) | seeds ahead (sampled) | mc ahead by (greedy) | seeds ahead (greedy) |"
    )
    paired = lines[lines.index(header) :]
    row = next(line for line in paired if line.startswith("| td | "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mean, half = statistics.mean(ahead), T975_DF1 * statistics.stdev(ahead) / math.sqrt(len(ahead))
    assert cells[1] == f"{mean:.3f} [{max(mean - half, -1.0):.3f}, {min(mean + half, 1.0):.3f}]"
    assert cells[2] == f"{sum(d > 0 for d in ahead)} of {len(SEEDS)}"
    assert not any(line.startswith("| mc | ") for line in paired[: paired.index("")])  # the reference is no row


def test_report_appends_the_conclusions_verbatim_and_names_a_missing_notes_file(sweep, capsys, tmp_path):
    notes = tmp_path / "conclusions.md"
    notes.write_text("## Conclusions\n\nWritten by a person.\n")
    output = tmp_path / "with_notes.md"
    res = run_inprocess(capsys, "report", "--sweep", str(sweep.out), "--output", str(output), "--notes", str(notes))
    assert res.returncode == 0, res.stderr
    text = output.read_text()
    assert text.rstrip().endswith("## Conclusions\n\nWritten by a person.") and f"--notes {notes}" in text
    missing = run_inprocess(
        capsys,
        "report",
        "--sweep",
        str(sweep.out),
        "--output",
        str(tmp_path / "x.md"),
        "--notes",
        str(tmp_path / "nope.md"),
    )
    assert missing.returncode == 2 and "nope.md" in missing.stderr and not (tmp_path / "x.md").exists()


def test_a_rates_interval_stays_in_zero_one_and_other_intervals_are_not_clipped():
    from iterppo_lightning.experiments.report import RATE, fmt_ci

    # Two seeds, 0.9 and 1.0: mean 0.95, half-width 12.706 * 0.0707 / sqrt(2) = 0.635.
    assert fmt_ci([0.9, 1.0], RATE) == "0.950 [0.315, 1.000]"
    assert fmt_ci([0.9, 1.0]) == "0.950 [0.315, 1.585]"  # an OPE gap is not a rate
    assert fmt_ci([0.05, 0.15], RATE) == "0.100 [0.000, 0.735]"


def test_a_fall_beyond_the_interval_of_the_difference_is_counted_and_a_small_one_is_not():
    from iterppo_lightning.experiments.report import Drops, drops

    # 0.5 -> 0.3: a fall of 0.2 against hypot(0.1, 0.1) = 0.141, beyond; 0.3 -> 0.35 a rise;
    # 0.35 -> 0.30: a fall of 0.05 against hypot(0.1, 0.02) = 0.102, within.
    evaluations = [(0.5, (0.4, 0.6)), (0.3, (0.2, 0.4)), (0.35, (0.25, 0.45)), (0.30, (0.28, 0.32))]
    found = drops(evaluations)
    assert found.beyond_interval == 1 and found.largest == pytest.approx(0.2)
    assert drops([(0.1, (0.0, 0.2)), (0.2, (0.1, 0.3))]) == Drops(0.0, 0)  # never fell
    assert drops([(0.9, None), (0.1, None)]) == Drops(pytest.approx(0.8), 0)  # no intervals: measured, not judged
    assert drops([(0.5, (0.4, 0.6))]) is None  # one evaluation has no fall


def test_the_main_experiment_is_compared_seed_by_seed_and_only_on_shared_seeds(tmp_path):
    from iterppo_lightning.experiments.report import Run, ahead_by_seed

    def runs(finals: dict[int, float]) -> list[Run]:
        return [Run("x", seed, tmp_path, True, records=[{"success_rate": rate}]) for seed, rate in finals.items()]

    # Seed 2 only in the main experiment, seed 3 only in the other: neither is compared.
    differences = ahead_by_seed(runs({0: 0.7, 1: 0.6, 2: 0.8}), runs({1: 0.65, 0: 0.5, 3: 0.9}))
    assert differences == [pytest.approx(0.2), pytest.approx(-0.05)]


def test_report_counts_conversations_from_the_records_or_the_config():
    from iterppo_lightning.experiments.report import conversation_counts

    assert conversation_counts([{"conversations_collected": 10}, {"conversations_collected": 25}], 99) == [10, 25]
    assert conversation_counts([{"collect": {"episodes": 8}}, {"collect": {"episodes": 4}}], 99) == [8, 12]
    assert conversation_counts([{}, {}, {}], 16) == [16, 32, 48]


def test_a_changed_experiment_is_refused_naming_the_run(sweep, capsys):
    changed = sweep.root / "changed" / "mc.yaml"  # same name, so the same run folders
    changed.parent.mkdir()
    changed.write_text(Path(sweep.configs[0]).read_text().replace("kl_coef: 0.05", "kl_coef: 0.2"))
    before = {k: tree_fingerprint(sweep.out / k) for k in sweep.runs}
    res = run_inprocess(capsys, "sweep", "--experiments", str(changed), "--seeds", "0", "--out", str(sweep.out))
    assert res.returncode == 2
    assert "mc seed 0" in res.stderr and "model.policy.init_args.kl_coef: 0.05 -> 0.2" in res.stderr
    assert {k: tree_fingerprint(sweep.out / k) for k in sweep.runs} == before


def _drop_key(config_file: Path, *path: str) -> None:
    config = yaml.safe_load(config_file.read_text())
    section = config
    for key in path[:-1]:
        section = section[key]
    del section[path[-1]]
    config_file.write_text(yaml.safe_dump(config))


def test_runs_made_before_a_key_existed_count_as_its_default(sweep, capsys, tmp_path):
    """A sweep extended after an upgrade: its finished runs' configs lack the keys added since."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sweep.out, out)
    for config_file in out.glob("*/seed_*/config.yaml"):  # the runs' pi_0 paths name the sweep's folder
        config_file.write_text(config_file.read_text().replace(str(sweep.out), str(out)))
    mc = [out / "mc" / f"seed_{s}" / "config.yaml" for s in SEEDS]
    for config_file in mc:
        _drop_key(config_file, "model", "loop", "branch_fraction")  # at its default, 0.0, in these runs
    args = ["sweep", "--experiments", *sweep.configs, "--seeds", *map(str, SEEDS), "--out", str(out)]
    res = run_inprocess(capsys, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {r["action"] for r in index(out)["runs"]} == {"skipped"}
    # A key missing from the saved config whose value now is not its default is a real change.
    _drop_key(mc[0], "model", "policy", "init_args", "max_new_tokens")  # the experiment sets 12
    res = run_inprocess(capsys, *args)
    assert res.returncode == 2
    assert "model.policy.init_args.max_new_tokens: not in the saved config (default 24) -> 12" in res.stderr


def test_quick_scales_every_experiment_alike_into_its_own_folder(sweep):
    from iterppo_lightning.experiments.sweep import QUICK_SCALE, _experiments, plan, quick_overrides

    config = {
        "model": {
            "loop": {"iterations": 4, "episodes_per_iteration": 512, "eval_episodes": 0},
            "bootstrap": {"episodes": 3000, "curriculum_steps": 0},
        },
        "data": {"policy_batches": 16},
    }
    assert quick_overrides(config) == [
        "--model.loop.iterations",
        "2",
        "--model.loop.episodes_per_iteration",
        "128",
        "--data.policy_batches",
        "4",
        "--model.bootstrap.episodes",
        "750",
    ]
    assert set(QUICK_SCALE) >= {"model.loop.iterations", "model.loop.episodes_per_iteration", "data.policy_batches"}
    experiments = _experiments(sweep.configs, quick=True, share_pi0=True)
    pi0, runs = plan(experiments, [0], sweep.out / "quick")
    assert {j.action for j in runs} == {"new"}  # the full runs are not quick runs
    assert all(j.folder.parent.parent == sweep.out / "quick" for j in runs)
    args = runs[0].args
    assert args[args.index("--model.loop.episodes_per_iteration") + 1] == str(EPISODES // 4)
    assert pi0 and all(j.folder.is_relative_to(sweep.out / "quick" / "pi_0") for j in pi0)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--experiments", "no/such/experiment.yaml", "--seeds", "0"], "no/such/experiment.yaml"),
        (["--seeds", "0", "x"], "seeds"),
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--seeds", "-1"], "non-negative"),
        (["--jobs", "0", "--seeds", "0"], "--jobs"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, args, named):
    if "--experiments" not in args:
        good = tmp_path / "good.yaml"
        good.write_text(TINY.format(critic=""))
        args = ["--experiments", str(good), *args]
    res = run_inprocess(capsys, "sweep", *args, "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert named in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_key_in_an_experiment_is_named(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text(TINY.format(critic="").replace("    iterations: 2\n", "    iterationz: 2\n"))
    res = run_inprocess(capsys, "sweep", "--experiments", str(bad), "--seeds", "0", "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and str(bad) in res.stderr and "iterationz" in res.stderr
    assert not (tmp_path / "out").exists()


def test_report_without_a_sweep_is_an_error(tmp_path, capsys):
    res = run_inprocess(capsys, "report", "--sweep", str(tmp_path), "--output", str(tmp_path / "r.md"))
    assert res.returncode == 2 and "sweep.json" in res.stderr


def test_bootstrap_refuses_an_existing_folder_and_a_given_pi0(tmp_path, capsys):
    from cli_helpers import SMOKE

    taken = tmp_path / "pi0"
    taken.mkdir()
    res = run_inprocess(capsys, "bootstrap", "--config", str(SMOKE), "--output", str(taken))
    assert res.returncode == 2 and str(taken) in res.stderr and "never overwritten" in res.stderr
    res = run_inprocess(
        capsys,
        "bootstrap",
        "--config",
        str(SMOKE),
        "--output",
        str(tmp_path / "new"),
        "--model.policy_init",
        str(taken),
    )
    assert res.returncode == 2 and "policy_init" in res.stderr and not (tmp_path / "new").exists()
    res = run_inprocess(capsys, "bootstrap", "--config", str(SMOKE))
    assert res.returncode == 2 and "--output" in res.stderr
