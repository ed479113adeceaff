"""The command-line setting shared by `ppo_phase.py` and `trl_ppo_reference.py`, so the two always measure the same.

Standard library only: `trl_ppo_reference.py` runs in a separate virtual environment without this project's
dependencies, and imports this file from the script's own folder.
"""

from __future__ import annotations

import argparse


def ppo_setting_parser(description: str, *, resp_help: str, updates_help: str, warmup_help: str):
    """The model shape, batch, prompt and reply lengths, PPO epochs/minibatches, updates, threads and seed."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer size, special tokens included")
    p.add_argument("--batch", type=int, default=64, help="prompts per PPO rollout (episodes per update)")
    p.add_argument(
        "--prompt-len", type=int, default=64, help="longest prompt; lengths uniform in [prompt_len/2, prompt_len]"
    )
    p.add_argument("--resp-len", type=int, default=32, help=resp_help)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--updates", type=int, default=5, help=updates_help)
    p.add_argument("--warmup-updates", type=int, default=1, help=warmup_help)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_lengths(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.prompt_len < 2 or args.resp_len < 1 or args.batch < 1 or args.updates < 1:
        p.error("--prompt-len >= 2, --resp-len >= 1, --batch >= 1 and --updates >= 1 are required")
