"""`CheckpointCallback`: save Q_k and pi_(k+1) into `iteration_<k>/`, atomically, and point `final_policy` at the newest."""

from __future__ import annotations

import os

import torch

from iterppo_lightning.stats import atomic_path, atomic_write_json

from .base import IterationCallback


class CheckpointCallback(IterationCallback):
    def on_iteration_end(self, loop, iteration: int, record: dict) -> None:
        out = loop.iteration_dir(iteration)
        critic = loop.system.critic
        with atomic_path(out / "critic.pt") as tmp:
            torch.save({"state_dict": critic.state_dict(), "hparams": dict(critic.hparams)}, tmp)
        loop.policy.save(out / "policy")
        atomic_write_json(out / "metrics.json", record)
        # `final_policy` -> newest policy; a symlink swapped in with rename, never half-updated.
        link = loop.run_dir / "final_policy"
        tmp_link = loop.run_dir / ".final_policy.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(os.path.relpath(out / "policy", loop.run_dir), tmp_link)
        os.replace(tmp_link, link)
