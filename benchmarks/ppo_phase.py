"""Throughput of the PPO policy phase alone: real `PolicyModule`, real Lightning Trainer, no simulator.

What runs
---------
One `lightning.Trainer(max_epochs=1, accelerator="cpu", ...)` fit of
`iterppo_lightning.modules.policy.PolicyModule` over `--updates` batches of
`--batch` synthetic prompts, exactly as the outer loop runs the policy phase:

* tokenizer: a word-level `PreTrainedTokenizerFast` trained with
  `tiny_lm.train_word_tokenizer` on synthetic words "w0".."w{V-10}", so it has
  `--vocab` entries including the special tokens (pad, eos = "<end>", ...);
* policy: `tiny_lm.build_tiny_causal_lm` (a GPT-2 of `--layers` x `--dim`,
  `--heads` heads), attached with `PolicyModule.attach` (which deep-copies the
  frozen reference);
* fixed Q: a `CriticModule` on a random backbone of the same shape (built from
  the policy's saved config, `init_from_policy=False`), attached with
  `attach_critic`; frozen, only its forward pass costs time;
* prompts: random non-special token ids, lengths uniform in
  [prompt_len/2, prompt_len], left-padded with `data.padding.pad_left`.

A random policy almost never samples EOS, so replies run to `--resp-len`
tokens; the actual mean reply length (`fit_stats["response_length"]`) is
reported. Before the measured fit, a separate warm-up fit of
`--warmup-updates` updates (default 1) runs on the same module and its timings
are discarded, so one-off costs (allocator growth, first-call dispatch, lazy
imports) do not skew the numbers.

What is measured
----------------
`PolicyModule.timings` accumulates seconds per stage: `generate` (sampling
with the KV cache, which also yields the rollout policy's log-probs and the
value head's inputs), `score_forward` (value head, reference and Q forwards
over [prompt; reply]), `update_forward`, `update_backward`, `optimizer_step`
(grad clip + AdamW). The phase wall time is the wall time of
the whole `trainer.fit` call (Trainer setup and teardown included: that is
what the outer loop pays per iteration); the time inside the training loop
alone is shown too. Everything not in generate / forward / backward (PPO
maths, GAE, optimizer step, Lightning bookkeeping, logging, `.item()` calls)
counts as "outside"; the target is that the outside share stays under 25 %.

Token rates count the batch's padded positions (the nominal work, the same
for every version of the module; the module itself trims each forward to
groups of similar length, so it computes fewer): generation = batch *
resp_len tokens per update / generate seconds; scoring = batch * (padded
prompt width + resp_len) sequence positions per update / score seconds (the
reference and Q read every position); PPO update = epochs_run * batch *
(prompt width + resp_len) / (update forward + backward seconds).
`phase_throughput.py --phase ppo` counts real against computed tokens.

Reference point (measured side by side with benchmarks/trl_ppo_reference.py, see benchmarks/README.md): TRL 1.12's
PPO trainer on this 2-core CPU, 2-layer 128-wide GPT-2, vocab 2048, batch 64,
prompts 32-64 tokens, 32 response tokens, 4 PPO epochs, 2 minibatches: about
17.65 episodes/s (median of 5 alternating runs).

Usage
-----
    python benchmarks/ppo_phase.py --layers 2 --dim 128 --heads 4 --vocab 2048 \
        --batch 64 --prompt-len 64 --resp-len 32 --ppo-epochs 4 --minibatches 2 --updates 5

The last line of stdout is one JSON object with every number and the arguments.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
from _common import (
    LoopTimer,
    fmt_rate,
    machine_info,
    make_trainer,
    prepare_run,
    print_json_line,
    print_stage_table,
    warn_if_busy,
)
from _ppo_setting import check_lengths, ppo_setting_parser

TRL_REFERENCE_EPISODES_PER_S = 17.65  # TRL 1.12.0, median of 5 side-by-side runs here (benchmarks/README.md)
OUTSIDE_SHARE_TARGET = 0.25
STAGES = ("generate", "score_forward", "update_forward", "update_backward", "optimizer_step")


def parse_args(argv=None) -> argparse.Namespace:
    p = ppo_setting_parser(
        __doc__.split("\n")[0],
        resp_help="max_new_tokens of the policy",
        updates_help="measured PPO updates (training steps)",
        warmup_help="updates of the separate, discarded warm-up fit (0: none)",
    )
    args = p.parse_args(argv)
    if args.vocab < 16:
        p.error("--vocab must be >= 16 (9 special tokens + words)")
    check_lengths(p, args)
    return args


def build_tokenizer(vocab: int):
    from iterppo_lightning.data.chat_format import SPECIAL_TOKENS
    from iterppo_lightning.models.tiny_lm import train_word_tokenizer

    n_words = vocab - len(SPECIAL_TOKENS)  # "w0".."w{V-10}"
    tok = train_word_tokenizer([" ".join(f"w{i}" for i in range(n_words))])
    if abs(len(tok) - vocab) > 2:
        raise RuntimeError(f"tokenizer has {len(tok)} entries, expected about {vocab}")
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise RuntimeError("tokenizer lacks eos/pad")
    return tok


def make_batches(tok, args, n_batches: int, gen: random.Random) -> list[dict[str, torch.Tensor]]:
    from iterppo_lightning.data.padding import pad_left

    allowed = sorted(set(range(len(tok))) - set(tok.all_special_ids))  # never eos / pad / other specials
    lo = max(1, args.prompt_len // 2)
    batches = []
    for _ in range(n_batches):
        seqs = [[gen.choice(allowed) for _ in range(gen.randint(lo, args.prompt_len))] for _ in range(args.batch)]
        ids, mask = pad_left(seqs, tok.pad_token_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def run_fit(module, batches) -> tuple[float, float]:
    """One policy-phase fit over these batches: (fit wall seconds, loop wall seconds)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)
    loop_timer = LoopTimer()
    trainer = make_trainer([loop_timer])
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - t0
    return wall, loop_timer.seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    prepare_run(args.threads, args.seed)

    from iterppo_lightning.models.tiny_lm import TinyLMConfig, build_tiny_causal_lm
    from iterppo_lightning.modules.critic import CriticModule
    from iterppo_lightning.modules.policy import PolicyModule

    load_before = os.getloadavg()[0]
    t_setup = time.perf_counter()
    tok = build_tokenizer(args.vocab)
    shape = TinyLMConfig(
        n_layer=args.layers, n_embd=args.dim, n_head=args.heads, n_positions=args.prompt_len + args.resp_len
    )
    model = build_tiny_causal_lm(tok, shape, seed=args.seed)
    module = PolicyModule(ppo_epochs=args.ppo_epochs, minibatches=args.minibatches, max_new_tokens=args.resp_len)
    module.attach(model, tok)
    module.max_new_tokens = args.resp_len
    critic = CriticModule(init_from_policy=False)
    with tempfile.TemporaryDirectory(prefix="ppo_phase_bench_") as tmp:
        model.save_pretrained(tmp)
        critic.build(tmp)
    module.attach_critic(critic)
    gen = random.Random(args.seed)
    warm_batches = make_batches(tok, args, args.warmup_updates, gen) if args.warmup_updates > 0 else []
    batches = make_batches(tok, args, args.updates, gen)
    setup_s = time.perf_counter() - t_setup

    warm_wall = None
    if warm_batches:
        warm_wall, _ = run_fit(module, warm_batches)
    module.timings.clear()  # discard everything the warm-up accumulated

    phase_wall, loop_wall = run_fit(module, batches)
    load_after = os.getloadavg()[0]
    timings = {k: float(module.timings.get(k, 0.0)) for k in STAGES}
    stats = dict(module.fit_stats)

    # -- derived numbers ---------------------------------------------------------------
    B, R = args.batch, args.resp_len
    prompt_widths = [b["input_ids"].shape[1] for b in batches]
    mean_prompt_width = sum(prompt_widths) / len(prompt_widths)
    mean_prompt_tokens = sum(int(b["attention_mask"].sum()) for b in batches) / (B * len(batches))
    seq_positions = sum(B * (w + R) for w in prompt_widths)  # padded [prompt; reply] positions, all updates
    epochs_run = stats.get("epochs_run", float(args.ppo_epochs))
    gen_tokens = B * R * args.updates
    update_tokens = epochs_run * seq_positions
    update_s = timings["update_forward"] + timings["update_backward"]
    model_s = timings["generate"] + timings["score_forward"] + update_s
    outside_share = 1.0 - model_s / phase_wall
    loop_outside_share = 1.0 - model_s / loop_wall
    untimed = phase_wall - sum(timings.values())

    def rate(n, s):
        return n / s if s > 0 else None

    rates = {
        "generate": rate(gen_tokens, timings["generate"]),
        "score_forward": rate(seq_positions, timings["score_forward"]),
        "update_forward": rate(update_tokens, timings["update_forward"]),
        "update_backward": rate(update_tokens, timings["update_backward"]),
    }
    episodes_per_s = B * args.updates / phase_wall
    result = {
        "episodes_per_s": episodes_per_s,
        "gen_tokens_per_s": rates["generate"],
        "score_tokens_per_s": rates["score_forward"],
        "update_tokens_per_s": rate(update_tokens, update_s),
        "phase_wall_s": phase_wall,
        "loop_wall_s": loop_wall,
        "outside_share": outside_share,
        "outside_share_loop_only": loop_outside_share,
        "outside_share_target": OUTSIDE_SHARE_TARGET,
        "outside_share_pass": outside_share < OUTSIDE_SHARE_TARGET,
        "timings_s": timings,
        "untimed_s": untimed,
        "mean_response_length": stats.get("response_length"),
        "ended_frac": stats.get("ended_frac"),
        "epochs_run": epochs_run,
        "mean_prompt_tokens": mean_prompt_tokens,
        "mean_prompt_width_padded": mean_prompt_width,
        "warmup": f"separate fit of {args.warmup_updates} update(s), timings discarded" if warm_batches else "none",
        "warmup_wall_s": warm_wall,
        "setup_s": setup_s,
        "tokenizer_size": len(tok),
        "policy_params": sum(p.numel() for p in model.parameters()),
        **machine_info(),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": load_after,
        "trl_reference_episodes_per_s": TRL_REFERENCE_EPISODES_PER_S,
        "vs_trl_reference": episodes_per_s / TRL_REFERENCE_EPISODES_PER_S,
        "args": vars(args),
    }

    # -- report ---------------------------------------------------------------------------
    print(
        f"PPO policy phase: GPT-2 {args.layers}x{args.dim} ({args.heads} heads, {result['policy_params']:,} params), "
        f"tokenizer {len(tok)}, batch {B}, prompts {max(1, args.prompt_len // 2)}-{args.prompt_len} tokens "
        f"(mean {mean_prompt_tokens:.1f}, padded width {mean_prompt_width:.1f}), replies <= {R} "
        f"(mean {stats.get('response_length', float('nan')):.1f}), "
        f"{args.ppo_epochs} PPO epochs x {args.minibatches} minibatches, "
        f"{args.updates} updates, {torch.get_num_threads()} torch threads"
    )
    print(f"warm-up: {result['warmup']}" + (f" ({warm_wall:.2f}s)" if warm_wall is not None else ""))
    rows = [(k, timings[k], rates.get(k)) for k in STAGES]
    rows.append(("other (untimed)", untimed, None))
    print_stage_table(rows, phase_wall, "phase (fit wall)", [("  training loop", loop_wall)])
    print(
        "tokens/s: generate = batch*resp_len/s; score_forward = padded [prompt;reply] positions/s through "
        "reference and Q; update = epochs*padded positions/s (nominal: the forwards are trimmed to length groups)"
    )
    print(f"PPO update tokens/s (forward+backward): {fmt_rate(result['update_tokens_per_s'])}")
    verdict = "PASS" if result["outside_share_pass"] else "FAIL"
    print(
        f"share of PPO-phase time outside model forward/backward/generate: {outside_share:.1%}  "
        f"[{verdict}: target < {OUTSIDE_SHARE_TARGET:.0%}]  (training loop only: {loop_outside_share:.1%})"
    )
    print(
        f"episodes/s: {episodes_per_s:.2f}  "
        f"(TRL 1.12.0 measured here: {TRL_REFERENCE_EPISODES_PER_S:.2f}/s "
        f"-> x{result['vs_trl_reference']:.2f})"
    )
    warn_if_busy(load_before, load_after)
    print_json_line(result)
    return result


if __name__ == "__main__":
    main()
