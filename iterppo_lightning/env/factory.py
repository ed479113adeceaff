"""The environment a run talks to: the scripted sales simulator, a chat model playing the customer, or the user's own
environment class (model.environment_class, env/protocol.py)."""

from __future__ import annotations

from iterppo_lightning.env.protocol import KEY as ENVIRONMENT_CLASS_KEY
from iterppo_lightning.env.protocol import ProtocolEnvironment
from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.models.source import check_source, load_causal_lm


def make_environment(system):
    """`system.environment_class` set: the user's class (one instance per episode); `system.llm_customer` set: an
    LLM customer (an endpoint, or a model loaded once, frozen); else the simulator."""
    if getattr(system, "environment_class", None) is not None:
        return ProtocolEnvironment.from_config(system.environment_class)
    if system.llm_customer is None:
        return SalesSimulator(system.environment)
    from iterppo_lightning.env.chat_endpoint import ChatEndpoint
    from iterppo_lightning.env.llm_customer import LLMCustomerEnvironment

    model, tokenizer, customer_endpoint = None, None, None
    if system.customer_endpoint is not None:
        customer_endpoint = ChatEndpoint(system.customer_endpoint, role="customer", key="model.customer_endpoint")
    else:
        model, tokenizer = load_causal_lm(system.customer_model or system.base_model, require_chat_template=True)
        model.requires_grad_(False).eval()
    judge, judge_tokenizer, judge_endpoint = None, None, None
    if system.llm_customer.judge == "model":
        if system.judge_endpoint is not None:
            judge_endpoint = ChatEndpoint(system.judge_endpoint, role="judge", key="model.judge_endpoint")
        elif system.judge_model is not None:
            judge, judge_tokenizer = load_causal_lm(system.judge_model, require_chat_template=True)
            judge.requires_grad_(False).eval()
    return LLMCustomerEnvironment(
        system.llm_customer,
        model,
        tokenizer,
        judge_model=judge,
        judge_tokenizer=judge_tokenizer,
        customer_endpoint=customer_endpoint,
        judge_endpoint=judge_endpoint,
    )


def check_environment_sources(system) -> None:
    """Bad customer / judge model paths fail before any work (endpoints are checked when the config is read); a run on
    the user's environment needs a pi_0 that is not the simulator's bootstrap."""
    if getattr(system, "environment_class", None) is not None:
        check_pi0_for_environment_class(system)
    if system.llm_customer is None:
        return
    if system.customer_endpoint is None:
        check_source(system.customer_model or system.base_model, require_chat_template=True)
    if system.judge_model is not None:
        check_source(system.judge_model, require_chat_template=True)


def check_pi0_for_environment_class(system) -> None:
    """pi_0's bootstrap imitates the scripted sales agent on the embedded simulator: meaningless elsewhere."""
    if system.policy_init or system.base_model is not None:
        return
    raise ValueError(
        f"{ENVIRONMENT_CLASS_KEY} needs pi_0 from model.base_model (a pretrained chat model) or model.policy_init (a "
        "saved policy folder): the built-in bootstrap imitates the scripted sales agent on the embedded simulator"
    )
