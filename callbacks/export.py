"""`ExportCallback`: finish each iteration's export: its metrics next to the policy, and `final_policy` -> newest
policy.

The loop itself writes the state a resume needs (buffer, critic.pt, the policy
folder with its lineage card); this callback only adds what a user reads.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from iterppo_lightning.utils.atomic_io import atomic_symlink, atomic_write_json

from .base import IterationCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


class ExportCallback(IterationCallback):
    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        out = loop.iteration_dir(iteration)
        atomic_write_json(out / "metrics.json", record)
        # `final_policy` -> newest policy, as a relative link swapped in atomically.
        atomic_symlink(os.path.relpath(out / "policy", loop.run_dir), loop.run_dir / "final_policy")
