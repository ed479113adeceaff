"""`IterativePPO`: the object the CLI's `model:` section builds.

It only groups what one run needs (the critic and policy LightningModules,
the environment, pi_0's recipe and the loop settings) so a single YAML file
configures everything; it is never trained itself. It subclasses
LightningModule because LightningCLI's `model` must be one.
"""

from __future__ import annotations

import lightning as L

from .bootstrap import BootstrapConfig
from .critic_module import CriticModule
from .loop_config import LoopConfig
from .policy_module import PolicyModule
from .sales_simulator import SimulatorConfig


class IterativePPO(L.LightningModule):
    def __init__(
        self,
        critic: CriticModule,
        policy: PolicyModule,
        environment: SimulatorConfig | None = None,
        bootstrap: BootstrapConfig | None = None,
        loop: LoopConfig | None = None,
        policy_init: str | None = None,
    ):
        """
        Args:
            critic: the Q-critic module (fit every iteration on Monte Carlo returns).
            policy: the PPO policy module.
            environment: the embedded sales simulator's settings.
            bootstrap: how pi_0 is made from imagined conversations (when policy_init is None).
            loop: outer-loop settings.
            policy_init: a saved policy folder to start from instead of bootstrapping pi_0.
        """
        super().__init__()
        self.critic = critic
        self.policy = policy
        self.environment = environment or SimulatorConfig()
        self.bootstrap = bootstrap or BootstrapConfig()
        self.loop = loop or LoopConfig()
        self.policy_init = policy_init
