"""Throughput of TRL's PPOTrainer on the setting of `ppo_phase.py`: the reference point for our policy phase.

TRL is not a dependency of this project. This script runs only in a separate virtual environment that has TRL
(see benchmarks/README.md); it imports nothing from `iterppo_lightning`.

What runs
---------
`trl.experimental.ppo.PPOTrainer` (TRL 1.12 keeps PPO under `trl.experimental`) on CPU, built to match
`benchmarks/ppo_phase.py` with the same flags:

* tokenizer: a word-level `PreTrainedTokenizerFast` with `--vocab` entries (pad, unk, eos = "<end>" and words
  "w0", "w1", ...), padding on the left;
* policy: a random GPT-2 of `--layers` x `--dim` (`--heads` heads, dropout off, n_positions = prompt + reply),
  built from config as `tiny_lm.build_tiny_causal_lm` does; the reference is a frozen copy of it;
* value model and reward model: random `GPT2ForSequenceClassification` (one label) of the same shape. TRL's PPO
  needs a separate value model; ours puts a linear value head on the policy's hidden states;
* prompts: random non-special token ids, lengths uniform in [prompt_len/2, prompt_len], left-padded by TRL's
  collator (`DataCollatorWithPadding`);
* batch `--batch` (per_device_train_batch_size, no gradient accumulation), `--minibatches` minibatches,
  `--ppo-epochs` epochs, `--resp-len` new tokens, temperature 1, no stop token (TRL's default: every reply is
  exactly `--resp-len` tokens), kl_coef 0.05, cliprange 0.2, cliprange_value 0.2, vf_coef 0.5, gamma 1, lam 0.95,
  lr 1e-4 (the hyperparameters of `PolicyModule`'s defaults where TRL has the same knob);
* fp32 (bf16 off; TRL's config would turn it on), no gradient checkpointing (TRL's config default is on), no
  logging integration, no progress bar or printed logs, no evaluation, no sample generations, no checkpoints.

What is measured
----------------
A separate warm-up `PPOTrainer` over `--warmup-updates` batches runs first on the same model objects and is
discarded. Then a second `PPOTrainer` (same policy, reference, value and reward models, new optimizer) is built
and its `train()` call is timed: episodes/s = batch * updates / train() wall, as ppo_phase.py divides by the
wall of its `trainer.fit` call. The loop alone (train begin to last step end) is reported too.

Per-stage seconds come from thin timers wrapped around TRL's own functions, without changing what they do:
`batch_generation` (generate), the no-grad `forward` of the reference plus the two `get_reward` calls (value and
reward model) in the rollout (score_forward), the grad-enabled `forward` of the policy-and-value wrapper in the
update (update_forward), `accelerator.backward` (update_backward) and `optimizer.step` (optimizer_step).

Usage
-----
    OMP_NUM_THREADS=1 /tmp/trl-venv/bin/python benchmarks/trl_ppo_reference.py --layers 2 --dim 128 --heads 4 \
        --vocab 2048 --batch 64 --prompt-len 64 --resp-len 32 --ppo-epochs 4 --minibatches 2 --updates 5 --threads 1

The last line of stdout is one JSON object with every number and the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict

from _ppo_setting import check_lengths, ppo_setting_parser

STAGES = ("generate", "score_forward", "update_forward", "update_backward", "optimizer_step")
SPECIALS = ("<pad>", "<unk>", "<end>")


def parse_args(argv=None) -> argparse.Namespace:
    p = ppo_setting_parser(
        __doc__.split("\n")[0],
        resp_help="new tokens per reply (TRL's response_length)",
        updates_help="measured PPO updates",
        warmup_help="updates of the separate, discarded warm-up trainer (0: none)",
    )
    args = p.parse_args(argv)
    if args.vocab < len(SPECIALS) + 8:
        p.error(f"--vocab must be >= {len(SPECIALS) + 8}")
    check_lengths(p, args)
    if args.batch % args.minibatches:
        p.error("TRL needs --batch to be a multiple of --minibatches")
    return args


def import_trl():
    """TRL's PPO classes, or exit with a message: TRL is deliberately not installed in the project's environment."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives under trl.experimental in TRL 1.12
    try:
        import trl
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_module
    except ImportError as exc:
        sys.exit(
            f"trl_ppo_reference.py needs TRL, which is not a dependency of this project ({exc}).\n"
            "Create a throwaway environment outside the repository and run the script with its python:\n"
            "  python3 -m venv /tmp/trl-venv\n"
            "  /tmp/trl-venv/bin/pip install torch==2.13.0\n"
            "  /tmp/trl-venv/bin/pip install trl==1.12.0 torch==2.13.0\n"
            "  /tmp/trl-venv/bin/python benchmarks/trl_ppo_reference.py ..."
        )
    return trl, PPOConfig, PPOTrainer, ppo_module


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    table = {token: i for i, token in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<end>", padding_side="left"
    )
    if len(tok) != vocab:
        raise RuntimeError(f"tokenizer has {len(tok)} entries, expected {vocab}")
    return tok


def build_models(tok, args):
    """Policy (GPT-2 LM), its frozen reference copy, value and reward models (GPT-2 with a one-label head)."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=args.prompt_len + args.resp_len,
        n_embd=args.dim,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        policy = GPT2LMHeadModel(config)
        value_model = GPT2ForSequenceClassification(config)
        reward_model = GPT2ForSequenceClassification(config)
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.generation_config.eos_token_id = tok.eos_token_id
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    reward_model.requires_grad_(False).eval()
    return policy, reference, value_model, reward_model


def make_dataset(tok, args, n_prompts: int, gen: random.Random):
    from datasets import Dataset

    allowed = sorted(set(range(len(tok))) - set(tok.all_special_ids))  # never eos / pad / unk
    lo = max(1, args.prompt_len // 2)
    prompts = [[gen.choice(allowed) for _ in range(gen.randint(lo, args.prompt_len))] for _ in range(n_prompts)]
    return Dataset.from_dict({"input_ids": prompts})


class StageTimers:
    """Wall seconds per stage, from wrappers around TRL's functions (they only add a clock read around each call)."""

    def __init__(self, ppo_module):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._module = ppo_module
        self._originals = {}

    def _timed(self, original, stage_of):
        def wrapper(*a, **kw):
            stage = stage_of()
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        return wrapper

    def install_module_hooks(self) -> None:
        import torch

        m = self._module
        self._originals = {name: getattr(m, name) for name in ("batch_generation", "forward", "get_reward")}
        m.batch_generation = self._timed(self._originals["batch_generation"], lambda: "generate")
        # `forward` serves the reference (no grad, rollout) and the policy-and-value wrapper (update, with grad).
        m.forward = self._timed(
            self._originals["forward"], lambda: "update_forward" if torch.is_grad_enabled() else "score_forward"
        )
        m.get_reward = self._timed(self._originals["get_reward"], lambda: "score_forward")

    def install_trainer_hooks(self, trainer) -> None:
        trainer.accelerator.backward = self._timed(trainer.accelerator.backward, lambda: "update_backward")
        trainer.optimizer.step = self._timed(trainer.optimizer.step, lambda: "optimizer_step")

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def make_loop_timer():
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        """Wall time of the training loop alone (train begin to the last update's end)."""

        def __init__(self):
            self.t_start = None
            self.t_end = None
            self.steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.t_end = time.perf_counter()
            self.steps += 1

        @property
        def seconds(self) -> float:
            return (self.t_end - self.t_start) if self.t_start is not None and self.t_end is not None else float("nan")

    return LoopTimer()


def make_trainer(PPOConfig, PPOTrainer, tok, models, dataset, args, out_dir, timers, loop_timer):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    policy, reference, value_model, reward_model = models
    config = PPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=args.minibatches,
        num_ppo_epochs=args.ppo_epochs,
        local_rollout_forward_batch_size=args.batch,
        total_episodes=len(dataset),
        response_length=args.resp_len,
        temperature=1.0,
        stop_token=None,
        kl_coef=0.05,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.5,
        gamma=1.0,
        lam=0.95,
        learning_rate=1e-4,
        num_sample_generations=0,
        report_to="none",
        disable_tqdm=True,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        callbacks=[loop_timer],
    )
    for cb in (PrinterCallback, ProgressCallback):  # no printed logs or progress bar
        trainer.remove_callback(cb)
    timers.install_trainer_hooks(trainer)
    return trainer


def fmt_rate(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    trl, PPOConfig, PPOTrainer, ppo_module = import_trl()
    import contextlib
    import io
    import logging
    import warnings

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    load_before = os.getloadavg()[0]
    t_setup = time.perf_counter()
    tok = build_tokenizer(args.vocab)
    models = build_models(tok, args)
    gen = random.Random(args.seed)
    warm_data = make_dataset(tok, args, args.batch * args.warmup_updates, gen) if args.warmup_updates > 0 else None
    data = make_dataset(tok, args, args.batch * args.updates, gen)
    timers = StageTimers(ppo_module)
    timers.install_module_hooks()
    setup_s = time.perf_counter() - t_setup

    quiet = io.StringIO()  # TRL prints "===training policy===" per train() call
    with tempfile.TemporaryDirectory(prefix="trl_ppo_bench_") as out_dir:
        warm_wall = None
        if warm_data is not None:
            warm_trainer = make_trainer(
                PPOConfig, PPOTrainer, tok, models, warm_data, args, out_dir, timers, make_loop_timer()
            )
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(quiet):
                warm_trainer.train()
            warm_wall = time.perf_counter() - t0
            del warm_trainer
        timers.clear()  # discard everything the warm-up accumulated

        loop_timer = make_loop_timer()
        t_build = time.perf_counter()
        trainer = make_trainer(PPOConfig, PPOTrainer, tok, models, data, args, out_dir, timers, loop_timer)
        build_s = time.perf_counter() - t_build
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(quiet):
            trainer.train()
        phase_wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    loop_wall = loop_timer.seconds
    if loop_timer.steps != args.updates:
        raise RuntimeError(f"TRL ran {loop_timer.steps} updates, expected {args.updates}")
    timings = {k: float(timers.seconds.get(k, 0.0)) for k in STAGES}

    # -- derived numbers (same definitions as ppo_phase.py) ------------------------------------
    B, R = args.batch, args.resp_len
    prompt_tokens = [len(x) for x in data["input_ids"]]
    mean_prompt_tokens = sum(prompt_tokens) / len(prompt_tokens)
    # TRL's DataLoader shuffles, so the padded widths of its batches are not known here; the expected width is
    # the mean over batches of the longest prompt, which for batch 64 and lengths in [32, 64] is ~64.
    gen_tokens = B * R * args.updates
    update_s = timings["update_forward"] + timings["update_backward"]
    model_s = timings["generate"] + timings["score_forward"] + update_s
    outside_share = 1.0 - model_s / phase_wall
    untimed = phase_wall - sum(timings.values())
    episodes_per_s = B * args.updates / phase_wall
    result = {
        "episodes_per_s": episodes_per_s,
        "episodes_per_s_loop_only": B * args.updates / loop_wall,
        "gen_tokens_per_s": gen_tokens / timings["generate"] if timings["generate"] > 0 else None,
        "phase_wall_s": phase_wall,
        "loop_wall_s": loop_wall,
        "trainer_build_s": build_s,
        "outside_share": outside_share,
        "timings_s": timings,
        "stage_calls": dict(timers.calls),
        "untimed_s": untimed,
        "response_length": R,
        "mean_prompt_tokens": mean_prompt_tokens,
        "warmup": f"separate trainer, {args.warmup_updates} update(s), discarded" if warm_data is not None else "none",
        "warmup_wall_s": warm_wall,
        "setup_s": setup_s,
        "tokenizer_size": len(tok),
        "policy_params": sum(p.numel() for p in models[0].parameters()),
        "value_model_params": sum(p.numel() for p in models[2].parameters()),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": load_after,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
    }

    # -- report ---------------------------------------------------------------------------------
    print(
        f"TRL {trl.__version__} PPOTrainer: GPT-2 {args.layers}x{args.dim} ({args.heads} heads, "
        f"{result['policy_params']:,} params; value and reward models of the same shape), tokenizer {len(tok)}, "
        f"batch {B}, prompts {max(1, args.prompt_len // 2)}-{args.prompt_len} tokens (mean {mean_prompt_tokens:.1f}), "
        f"replies = {R} tokens, {args.ppo_epochs} PPO epochs x {args.minibatches} minibatches, "
        f"{args.updates} updates, {torch.get_num_threads()} torch threads"
    )
    print(f"warm-up: {result['warmup']}" + (f" ({warm_wall:.2f}s)" if warm_wall is not None else ""))
    rows = [(k, timings[k], gen_tokens / timings[k] if k == "generate" and timings[k] > 0 else None) for k in STAGES]
    rows.append(("other (untimed)", untimed, None))
    header = f"{'stage':<18}{'seconds':>10}{'share':>9}{'tokens/s':>12}"
    print(header)
    print("-" * len(header))
    for name, secs, r in rows:
        print(f"{name:<18}{secs:>10.3f}{secs / phase_wall:>8.1%}{fmt_rate(r):>13}")
    print("-" * len(header))
    print(f"{'train() wall':<18}{phase_wall:>10.3f}{1:>8.0%}")
    print(f"{'  training loop':<18}{loop_wall:>10.3f}{loop_wall / phase_wall:>8.1%}")
    print(f"share of train() time outside model forward/backward/generate: {outside_share:.1%}")
    print(f"episodes/s: {episodes_per_s:.2f}  (training loop only: {result['episodes_per_s_loop_only']:.2f})")
    busy = max(load_before, load_after)
    if busy > 0.5 * (os.cpu_count() or 1):
        print(
            f"WARNING: 1-min load average {busy:.1f} on {os.cpu_count()} CPUs: other processes compete for the cores, "
            "numbers are noisy"
        )
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
