"""`iterppo bootstrap`: pi_0 alone, made exactly as `fit` bootstraps it, into a new folder.

    iterppo bootstrap --config C --seed_everything 0 --output runs/pi0_seed0
    iterppo fit --config C --seed_everything 0 --model.policy_init runs/pi0_seed0/policy ...

`iterppo sweep` makes one per seed this way and shares it between experiments with the same pi_0 recipe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L

from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.loop.bootstrap import make_pi0
from iterppo_lightning.loop.run_dir import write_bootstrap_record
from iterppo_lightning.utils.atomic_io import atomic_dir
from iterppo_lightning.utils.seeding import derive_seed

if TYPE_CHECKING:
    from iterppo_lightning.data.datamodule import TrajectoryDataModule
    from iterppo_lightning.system import IterativePPO

__all__ = ["bootstrap_pi0"]


def bootstrap_pi0(
    model: IterativePPO,
    datamodule: TrajectoryDataModule,
    trainer_factory: Callable[..., L.Trainer],
    output: str,
    seed: int,
) -> dict:
    """pi_0 by behaviour cloning, with the seeds `OuterLoop.make_initial_policy` uses: the weights `fit` would make.

    `trainer_factory(phase, **overrides)` makes a fresh Trainer for one phase (the CLI builds it from the config).
    """
    if not output:
        raise ValueError("bootstrap needs --output DIR (a new folder for pi_0)")
    if model.policy_init or model.base_model is not None:
        raise ValueError(
            "bootstrap makes pi_0 from imagined conversations; "
            "this config already names pi_0 (model.policy_init or model.base_model)"
        )
    if getattr(model, "environment_class", None) is not None:
        raise ValueError(
            "bootstrap imitates the scripted sales agent on the embedded simulator; this config plays "
            "model.environment_class: give fit a pi_0 with model.base_model or model.policy_init instead"
        )
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{output!r} already exists; a pi_0 folder is never overwritten")
    with atomic_dir(out) as tmp:  # complete or absent: a killed bootstrap leaves only a temporary folder
        L.seed_everything(derive_seed(seed, -1, "bootstrap"), verbose=False)
        start = time.perf_counter()
        simulator = SalesSimulator(model.environment)
        net, tokenizer = make_pi0(model.bootstrap, simulator, datamodule, trainer_factory, tmp, seed)
        model.policy.attach(net, tokenizer)
        card = {"policy_id": "pi_0", "run_id": None, "parent": None, "source": "bootstrap", "seed": seed}
        model.policy.save(tmp / "policy", card=card)
        seconds = time.perf_counter() - start
        write_bootstrap_record(tmp, seconds, model.bootstrap.episodes, seed=seed)
    return {"output": str(out), "policy": str(out / "policy"), "seed": seed, "seconds": seconds}
