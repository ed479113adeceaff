"""`ExportCallback`: finish each iteration's export: its metrics next to the policy, and `final_policy` -> newest
policy.

The loop itself writes the state a resume needs (buffer, critic.pt, the policy
folder with its lineage card); this callback only adds what a user reads.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from iterppo_lightning.utils.atomic_io import atomic_write_json

from .base import IterationCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


class ExportCallback(IterationCallback):
    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        out = loop.iteration_dir(iteration)
        atomic_write_json(out / "metrics.json", record)
        # `final_policy` -> newest policy; a symlink swapped in with rename, never half-updated.
        link = loop.run_dir / "final_policy"
        tmp_link = loop.run_dir / ".final_policy.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(os.path.relpath(out / "policy", loop.run_dir), tmp_link)
        os.replace(tmp_link, link)
