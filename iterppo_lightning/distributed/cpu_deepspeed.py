"""Lightning's DeepSpeedStrategy on CPU processes over gloo (for CI and laptops; GPUs use the stock strategy).

Lightning 2.6's ``DeepSpeedStrategy`` is written for CUDA. DeepSpeed itself runs on CPU (its ``CPU_Accelerator``
is picked automatically when no GPU is found, and it talks over gloo), so three small overrides suffice:

1. ``setup_environment``: the stock method raises unless the accelerator is ``CUDAAccelerator``. We run the
   ``DDPStrategy`` path (CPU device check + ``setup_distributed``) instead.
2. ``setup_distributed``: the stock method calls ``_validate_device_index_selection``, which requires the
   device indices to be ``0..n-1``; CPU devices from ``CPUAccelerator`` have no index, so it fails. We keep the
   rest (seed reset, world ranks, ``deepspeed.init_distributed``) unchanged.
3. ``root_device``: returns ``torch.device("cpu", local_rank)``. Lightning passes
   ``device_rank=root_device.index`` to ``deepspeed.initialize``, and DeepSpeed's engine compares it with 0
   (``None >= 0`` raises ``TypeError`` for the index-less ``torch.device("cpu")``).

One optional speed-up, on by default: ``skip_shm_comm_op=True`` stops ``deepspeed.init_distributed`` from
JIT-compiling its shared-memory all-reduce op (``deepspeed_shm_comm``; ~45 s with a C++ compiler on the first run,
cached afterwards under ``~/.cache/torch_extensions``). That op only serves DeepSpeed's tensor-parallel *inference*
all-reduce; ZeRO training collectives go through ``torch.distributed`` (gloo) either way.

Plus two defaults: ``process_group_backend="gloo"`` and ``zero_force_ds_cpu_optimizer: false`` in the
DeepSpeed config, so a plain ``torch.optim`` optimizer from ``configure_optimizers`` is accepted even with
``offload_optimizer=True`` (DeepSpeed otherwise insists on ``DeepSpeedCPUAdam``, which needs a C++ compiler
to JIT-build its op). Without offload, Lightning's default ``zero_allow_untested_optimizer: true`` is enough.

Use from YAML::

    trainer:
      accelerator: cpu
      devices: 2
      strategy:
        class_path: iterppo_lightning.distributed.cpu_deepspeed.CPUDeepSpeedStrategy
        init_args: {stage: 3}

Precision must stay ``32-true`` (fp16/bf16 mixed precision paths in DeepSpeed assume an accelerator).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import reset_seed

__all__ = ["CPUDeepSpeedStrategy"]


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` for ``accelerator="cpu"``: ZeRO-1/2/3 across CPU processes over gloo.

    Accepts every ``DeepSpeedStrategy`` argument. A JSON/dict ``config`` overrides ``stage`` and the offload
    arguments (stock Lightning behaviour); ``zero_force_ds_cpu_optimizer`` is added to it unless present.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(
        self, *args: Any, process_group_backend: str | None = "gloo", skip_shm_comm_op: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)
        self.skip_shm_comm_op = skip_shm_comm_op
        if isinstance(self.config, dict):
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads `root_device.index` as `device_rank` and compares it with 0.
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA-only check; DDPStrategy's path checks the device type and calls
        # `self.setup_distributed()` (below).
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # Same as DeepSpeedStrategy.setup_distributed minus `_validate_device_index_selection`.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_deepspeed_distributed(self) -> None:
        if not self.skip_shm_comm_op:
            super()._init_deepspeed_distributed()
            return
        # `import deepspeed.comm.torch as m` would bind the `torch` package: `deepspeed.comm` has a `torch` attribute.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

        build = ds_comm_torch.build_shm_op
        ds_comm_torch.build_shm_op = lambda: None  # TorchBackend then uses torch.distributed for every collective
        try:
            super()._init_deepspeed_distributed()
        finally:
            ds_comm_torch.build_shm_op = build
