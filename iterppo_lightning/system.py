"""`IterativePPO`: the object the CLI's `model:` section builds.

It only groups what one run needs (the critic and policy LightningModules,
the environment, pi_0's recipe and the loop settings) so a single YAML file
configures everything; it is never trained itself. It subclasses
LightningModule because LightningCLI's `model` must be one.
"""

from __future__ import annotations

import lightning as L

from iterppo_lightning.env.chat_endpoint import ChatEndpointConfig
from iterppo_lightning.env.chat_endpoint import config_problems as endpoint_problems
from iterppo_lightning.env.llm_customer import LLMCustomerConfig
from iterppo_lightning.env.protocol import read_environment_class, resolve_class
from iterppo_lightning.env.sales_simulator import SimulatorConfig
from iterppo_lightning.loop.bootstrap import BootstrapConfig
from iterppo_lightning.loop.config import ALGORITHMS, FilteredBCConfig, LoopConfig
from iterppo_lightning.models.source import ModelSource
from iterppo_lightning.modules.critic import CriticModule
from iterppo_lightning.modules.policy import PolicyModule


class IterativePPO(L.LightningModule):
    def __init__(
        self,
        critic: CriticModule,
        policy: PolicyModule,
        environment: SimulatorConfig | None = None,
        bootstrap: BootstrapConfig | None = None,
        loop: LoopConfig | None = None,
        policy_init: str | None = None,
        base_model: ModelSource | None = None,
        llm_customer: LLMCustomerConfig | None = None,
        customer_model: ModelSource | None = None,
        judge_model: ModelSource | None = None,
        customer_endpoint: ChatEndpointConfig | None = None,
        judge_endpoint: ChatEndpointConfig | None = None,
        algorithm: str = "iterative_ppo",
        filtered_bc: FilteredBCConfig | None = None,
        environment_class: dict | None = None,
        system_prompt: str | None = None,
    ):
        """
        Args:
            critic: the Q-critic module (fit every iteration on Monte Carlo returns).
            policy: the PPO policy module.
            environment: the embedded sales simulator's settings.
            bootstrap: how pi_0 is made from imagined conversations (when policy_init is None).
            loop: outer-loop settings.
            policy_init: a saved policy folder to start from instead of bootstrapping pi_0.
            base_model: a pretrained chat model as pi_0 (a folder, a cached hub id, a GGUF file,
                or "pypackage:NAME"); copied into the run as pi_0, and the critic's backbone
                starts from it. Excludes policy_init.
            llm_customer: let a chat model play the customer (from persona cards) instead of the
                scripted simulator, for collection and evaluation.
            customer_model: the model playing the customer (default: base_model).
            judge_model: the model answering llm_customer's yes/no purchase question when its
                judge is "model" (default: the customer model).
            customer_endpoint: an OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama, a
                hosted API) playing the customer instead of customer_model. See docs/llm_customer.md.
            judge_endpoint: an endpoint answering the judge's yes/no question instead of judge_model
                (default: the customer's endpoint or model).
            algorithm: "iterative_ppo" (fit Q_k, then PPO against it) or "filtered_bc" (the
                baseline: fine-tune pi_k with the SFT loss on the agent turns of the iteration's
                successful conversations; no critic). See docs/variants.md.
            filtered_bc: epochs, lr and batch size of the filtered_bc fine-tune.
            environment_class: your own environment instead of the embedded simulator, as
                ``{class_path: my_package.MyEnv, init_args: {...}}``: a class with reset(seed) and
                step(agent_message) (docs/environments.md). fit, evaluate, collect and sample use it.
            system_prompt: a system message for a chat base_model (e.g. what the shop sells). It is baked into
                pi_0's chat template as its default system message, so every state the policy and the critic read
                starts with it and every exported policy carries it (data/rendering.py). None: the model's own
                template as it is.
        """
        super().__init__()
        self.critic = critic
        self.policy = policy
        self.environment_given = environment is not None
        self.environment = environment or SimulatorConfig()
        self.environment_class = None
        problems: list[str] = []
        if environment_class is not None:
            try:
                self.environment_class = read_environment_class(environment_class)
            except ValueError as error:
                problems.append(str(error))
        self.bootstrap = bootstrap or BootstrapConfig()
        self.loop = loop or LoopConfig()
        self.policy_init = policy_init
        self.base_model = base_model
        self.llm_customer = llm_customer
        self.customer_model = customer_model
        self.judge_model = judge_model
        self.system_prompt = system_prompt
        if algorithm not in ALGORITHMS:
            raise ValueError(f"model.algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.filtered_bc = filtered_bc or FilteredBCConfig()
        if policy_init and base_model is not None:
            raise ValueError(
                "give either model.policy_init (a saved policy) or model.base_model (a pretrained model), not both"
            )
        self.customer_endpoint = customer_endpoint
        self.judge_endpoint = judge_endpoint
        problems += customer_problems(self) + environment_class_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


def customer_problems(system: IterativePPO) -> list[str]:
    """Every inconsistency of the LLM customer's settings (models, endpoints, the API key variables), at once."""
    out: list[str] = []
    endpoints = {"customer_endpoint": system.customer_endpoint, "judge_endpoint": system.judge_endpoint}
    for key, endpoint in endpoints.items():
        if endpoint is None:
            continue
        if system.llm_customer is None:
            out.append(f"model.{key} is set but model.llm_customer is not: add an llm_customer section")
        out.extend(endpoint_problems(endpoint, f"model.{key}"))
    if system.customer_endpoint is not None and system.customer_model is not None:
        out.append(
            "give either model.customer_model or model.customer_endpoint (the customer is a model or an endpoint), "
            "not both"
        )
    if system.judge_endpoint is not None and system.judge_model is not None:
        out.append("give either model.judge_model or model.judge_endpoint, not both")
    if system.llm_customer is not None:
        if system.judge_endpoint is not None and system.llm_customer.judge != "model":
            out.append(
                f"model.judge_endpoint is set but model.llm_customer.judge is {system.llm_customer.judge!r}: "
                "set it to model to use the endpoint as the judge, or remove model.judge_endpoint"
            )
        if system.customer_endpoint is None and (system.customer_model or system.base_model) is None:
            out.append(
                "model.llm_customer needs model.customer_model (or model.base_model, or model.customer_endpoint) "
                "to play the customer"
            )
    return out


# What needs the embedded simulator itself: it replays a logged state from the conversation's seed, which a user's
# environment (any object with reset and step) cannot promise.
_SIMULATOR_ONLY = (
    ("critic_probe", "measures Q_k against the embedded simulator's ground truth (it replays logged states)"),
    ("oracle_critic", "computes Q from the embedded simulator's continuations of logged states"),
    ("table_critic", "reads the embedded simulator's conversations with its own parsers"),
)


def environment_class_problems(system: IterativePPO) -> list[str]:
    """Every setting that makes no sense with model.environment_class (a user's environment), at once."""
    config = system.environment_class
    if config is None:
        return []
    out: list[str] = []
    try:
        resolve_class(config)
    except ValueError as error:
        out.append(str(error))
    if system.llm_customer is not None:
        out.append(
            "give either model.environment_class (your environment) or model.llm_customer (a chat model playing "
            "the customer), not both"
        )
    if system.environment_given:
        out.append(
            "model.environment configures the embedded simulator, which model.environment_class replaces: remove "
            "model.environment (your class's settings go in model.environment_class.init_args)"
        )
    for key, what in _SIMULATOR_ONLY:
        if getattr(system.loop, key, None) is not None:
            out.append(f"model.loop.{key} {what}; a run on model.environment_class cannot: remove model.loop.{key}")
    if system.loop.branch_fraction > 0:
        out.append(
            f"model.loop.branch_fraction {system.loop.branch_fraction} replays states of the embedded simulator's "
            "conversations, which model.environment_class cannot: set model.loop.branch_fraction 0"
        )
    return out
