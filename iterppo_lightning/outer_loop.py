"""`OuterLoop`: the plain-Python controller of Iterative PPO.

Per iteration k: callbacks collect with pi_k -> fit Q_k (fresh Trainer) ->
fit pi_(k+1) with PPO (fresh Trainer) -> callbacks evaluate, checkpoint,
report and decide to stop. Lightning 2.x has no public loop API, and a
Trainer's second `fit` trains nothing, hence a controller around fresh
Trainers instead of a custom fit loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import lightning as L

from .bootstrap import make_pi0
from .buffer import load_buffer
from .modeling import check_policy_dir
from .sales_simulator import SalesSimulator
from .stats import atomic_write_json, atomic_write_text

TrainerFactory = Callable[..., L.Trainer]


class RunDirError(RuntimeError):
    """The run directory cannot be used (already holds a run, or is not writable)."""


def prepare_run_dir(run_dir: Path) -> None:
    """Refuse to reuse a run directory, and fail before any work if it is not writable."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run_dir {str(run_dir)!r} already holds files; choose a new --run_dir (runs are never overwritten)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir {str(run_dir)!r} is not writable: {err}") from err


class OuterLoop:
    def __init__(self, system, datamodule, trainer_factory: TrainerFactory, run_dir: str | Path, callbacks: list, seed: int = 0, config_text: str | None = None):
        self.system = system
        self.config = system.loop
        self.datamodule = datamodule
        self.trainer_factory = trainer_factory
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.seed = seed
        self.config_text = config_text
        self.environment = SalesSimulator(system.environment)
        self.num_iterations = self.config.iterations
        self.history: list[dict] = []
        self.should_stop = False
        self.initial_eval: dict | None = None
        self.iteration = -1
        self.record: dict = {}
        self.buffer_path: Path | None = None
        self.base_model_dir: Path | None = None

    # -- helpers used by callbacks ---------------------------------------------------
    @property
    def policy(self):
        return self.system.policy

    def iteration_dir(self, k: int) -> Path:
        return self.run_dir / f"iteration_{k}"

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- phases ---------------------------------------------------------------------------
    def make_initial_policy(self) -> None:
        """pi_0: a given folder, or behaviour cloning on imagined conversations."""
        policy = self.system.policy
        if self.system.policy_init:
            policy.load(self.system.policy_init)
            self.base_model_dir = Path(self.system.policy_init)
            return
        out = self.run_dir / "pi_0"
        L.seed_everything(self.seed, verbose=False)
        start = time.perf_counter()
        model, tokenizer = make_pi0(self.system.bootstrap, self.environment, self.datamodule, self.trainer_factory, out, self.seed)
        policy.attach(model, tokenizer)
        policy.save(out / "policy")
        self.base_model_dir = out / "policy"
        atomic_write_json(out / "bootstrap.json", {"seconds": time.perf_counter() - start, "episodes": self.system.bootstrap.episodes})

    def fit_critic(self, k: int) -> dict:
        critic, dm = self.system.critic, self.datamodule
        dm.connect(self.policy.tokenizer)
        dm.set_conversations(load_buffer(self.buffer_path))
        dm.use_phase("critic")
        if not critic.is_built or not critic.warm_start:
            critic.build(self.base_model_dir)
        trainer = self.trainer_factory(
            "critic", max_epochs=self.config.critic_epochs, default_root_dir=str(self.iteration_dir(k) / "critic_logs")
        )
        trainer.fit(critic, datamodule=dm)
        return {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("critic/val")}

    def fit_policy(self, k: int) -> dict:
        policy, dm = self.system.policy, self.datamodule
        dm.use_phase("policy")
        policy.attach_critic(self.system.critic)
        trainer = self.trainer_factory("policy", max_epochs=1, default_root_dir=str(self.iteration_dir(k) / "policy_logs"))
        trainer.fit(policy, datamodule=dm)
        return dict(policy.fit_stats)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        if self.system.policy_init:
            check_policy_dir(self.system.policy_init)  # a typo must not leave a half-started run_dir behind
        prepare_run_dir(self.run_dir)
        if self.config_text is not None:
            atomic_write_text(self.run_dir / "config.yaml", self.config_text)
        self.make_initial_policy()
        self._call("on_run_start")
        for k in range(self.num_iterations):
            self.iteration = k
            # Reseeding per iteration makes iteration k reproducible on its own (needed for resume).
            L.seed_everything(self.seed * 1000 + k, verbose=False)
            self.record = {"iteration": k, "policy": f"pi_{k + 1}", "seconds": {}}
            self._call("on_iteration_start", k)

            start = time.perf_counter()
            critic_metrics = self.fit_critic(k)
            self.record["seconds"]["critic"] = time.perf_counter() - start
            self.record["critic"] = critic_metrics
            self._call("on_critic_end", k, critic_metrics)

            start = time.perf_counter()
            ppo_metrics = self.fit_policy(k)
            self.record["seconds"]["policy"] = time.perf_counter() - start
            self.record["ppo"] = ppo_metrics
            self._call("on_policy_end", k, ppo_metrics)

            self._call("on_iteration_end", k, self.record)
            self.history.append(self.record)
            if self.should_stop:
                break
        summary = {"final_policy": str(self.run_dir / f"iteration_{self.history[-1]['iteration']}" / "policy")}
        self._call("on_run_end", summary)
        return summary
