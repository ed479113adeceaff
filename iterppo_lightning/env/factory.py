"""The environment a run talks to: the scripted sales simulator, or a chat model playing the customer."""

from __future__ import annotations

from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.models.source import load_causal_lm


def make_environment(system):
    """`system.llm_customer` set: an LLM customer (its model loaded once, frozen); else the simulator."""
    if system.llm_customer is None:
        return SalesSimulator(system.environment)
    from iterppo_lightning.env.llm_customer import LLMCustomerEnvironment

    model, tokenizer = load_causal_lm(system.customer_model or system.base_model, require_chat_template=True)
    model.requires_grad_(False).eval()
    judge, judge_tokenizer = None, None
    if system.judge_model is not None and system.llm_customer.judge == "model":
        judge, judge_tokenizer = load_causal_lm(system.judge_model, require_chat_template=True)
        judge.requires_grad_(False).eval()
    return LLMCustomerEnvironment(
        system.llm_customer, model, tokenizer, judge_model=judge, judge_tokenizer=judge_tokenizer
    )
