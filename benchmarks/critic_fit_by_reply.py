"""How well Q_k fits its own data, by kind of reply: mean Q against mean Monte Carlo return on the logged turns.

The critic probe (`iterppo probe-critic`) asks how Q_k ranks replies against the simulator's ground truth, at states
it did not necessarily see. This asks the simpler question first: on the turns Q_k was fitted to (iteration k's
buffer, validation split included, about a tenth of it), does it reproduce the returns of each kind of reply? A
kind whose mean Q is far from its mean return is not fitted, however the probe comes out; a kind fitted here and
wrong in the probe is memorised, not learned. Kinds are read with the simulator's own reply parser at each
logged state (what the customer has revealed; `benchmarks/_reply_kinds.py` lists them).

    python benchmarks/critic_fit_by_reply.py --run_dir RUN [--iteration K] [--on_iteration J]

With `--on_iteration K+1` it scores Q_k on the replies of the next policy instead, the one PPO made against Q_k:
a kind that Q_k rates far above the return it got there is one PPO moved towards because Q_k over-rates it. (The
returns there are pi_(k+1)'s after the reply, not pi_k's, so compare kinds, not single values.)

Prints a table and, last, one JSON line (`kinds`: n, mean_q, mean_return per kind).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from _reply_kinds import KINDS, reply_kind

from iterppo_lightning.data.buffer import load_buffer
from iterppo_lightning.data.rendering import render_state, render_suggestion
from iterppo_lightning.loop.run_dir import RunFolder
from iterppo_lightning.models.policy_folder import load_policy
from iterppo_lightning.modules.critic import CriticModule
from iterppo_lightning.rl.critic_targets import score_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="a finished run on the embedded simulator")
    parser.add_argument("--iteration", type=int, default=0, help="k: Q_k on iteration k's buffer")
    parser.add_argument("--on_iteration", type=int, default=None, help="j: score iteration j's buffer (default k)")
    args = parser.parse_args()
    on = args.iteration if args.on_iteration is None else args.on_iteration
    run = Path(args.run_dir)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    model, data = config.get("model") or {}, config.get("data") or {}
    folder = RunFolder(run, model.get("policy_init"))
    critic_file = folder.critic_file(args.iteration)
    if not critic_file.is_file():
        parser.error(f"{critic_file} does not exist: iteration {args.iteration} of {run} fitted no critic")
    saved = torch.load(critic_file, weights_only=False)
    critic = CriticModule(**saved["hparams"])
    folder.load_critic(critic, critic_file, folder.policy_dir(0))
    _, tokenizer = load_policy(folder.policy_dir(args.iteration))
    prompt_tokens, action_tokens = int(data.get("max_prompt_tokens", 384)), int(data.get("max_action_tokens", 24))
    gamma = float(data.get("gamma", 0.9))

    kinds, returns, prompts, replies = [], [], [], []
    if not folder.buffer_dir(on).is_dir():
        parser.error(f"{folder.buffer_dir(on)} does not exist: {run} collected no batch at iteration {on}")
    for conversation in load_buffer(folder.buffer_dir(on)):
        if conversation.iteration != on:
            continue
        for turn, g in zip(conversation.agent_turns, conversation.returns(gamma)):
            kinds.append(reply_kind(conversation, turn))
            returns.append(g)
            state = render_state(conversation, turn, tokenizer)
            reply = render_suggestion(conversation.turns[turn].suggestion, tokenizer)
            prompts.append(tokenizer(state, add_special_tokens=False)["input_ids"][-prompt_tokens:])
            replies.append(tokenizer(reply, add_special_tokens=False)["input_ids"][:action_tokens])
    q = score_pairs(critic, prompts, replies, tokenizer.pad_token_id)

    cells: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for kind, qq, g in zip(kinds, q, returns):
        cells[kind].append((qq, g))
    table = {}
    whose = "its own" if on == args.iteration else f"iteration {on}'s"
    print(f"Q_{args.iteration} of {run} on {whose} {len(q)} logged turns")
    print(f"{'kind':<22}{'n':>6}{'mean Q':>9}{'mean return':>13}")
    for kind in KINDS:
        if cells[kind]:
            n = len(cells[kind])
            mean_q, mean_g = sum(c[0] for c in cells[kind]) / n, sum(c[1] for c in cells[kind]) / n
            table[kind] = {"n": n, "mean_q": round(mean_q, 4), "mean_return": round(mean_g, 4)}
            print(f"{kind:<22}{n:>6}{mean_q:>9.3f}{mean_g:>13.3f}")
    print(
        json.dumps(
            {"run_dir": str(run), "iteration": args.iteration, "on_iteration": on, "turns": len(q), "kinds": table}
        )
    )


if __name__ == "__main__":
    main()
