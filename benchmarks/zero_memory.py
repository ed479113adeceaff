"""Peak memory per process of a GPT-2 + AdamW fit on 2 CPU processes: DDP (no sharding) vs ZeRO-2 vs ZeRO-3.

What runs
---------
For each mode, one `lightning.Trainer(accelerator="cpu", devices=2, max_steps=--steps)` fit of a GPT-2
(`--layers` x `--dim`, `--vocab` tokens, untied LM head) built in `configure_model()` (so under ZeRO-3 it is
created already partitioned by `deepspeed.zero.Init`), trained with `torch.optim.AdamW` on random tokens
(`--batch` sequences of `--seq` tokens per process):

* `ddp`:   `DDPStrategy(process_group_backend="gloo")`: every process holds everything;
* `zero2`: `CPUDeepSpeedStrategy(stage=2)`: gradients and optimizer states sharded;
* `zero3`: `CPUDeepSpeedStrategy(stage=3)`: parameters sharded too.

Lightning's own launcher starts the second process; each mode is a fresh pair of processes (this script runs
itself with `--worker MODE`). Modes run one after the other, never at the same time.

What is measured
----------------
Per process, `VmHWM` (peak resident set) from `/proc/self/status` at the end of fit, minus `VmRSS` taken in
`LightningModule.setup()`: after the imports and after the process group is up, before the model exists. The
difference is what the model state (params, grads, Adam states, DeepSpeed's buffers) and the activations of one
step cost. The RSS of an idle process (same imports, no model) is printed too, for scale. The table shows the
larger of the two ranks.

Theory (fp32, Psi parameters, N processes): unsharded 16 Psi bytes (4 params + 4 grads + 8 Adam m and v);
ZeRO-2: 4 Psi + 12 Psi / N; ZeRO-3: 16 Psi / N. Not counted by the formulas: activations, DDP's gradient
buckets (a second copy of the grads), DeepSpeed's fp32 master partition copy (+4 Psi / N for ZeRO-1/2), its
communication buckets, the gathered copies of the layers in use under ZeRO-3, and allocator slack.

    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py --out runs/zero_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MODES = ("ddp", "zero2", "zero3")
MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def n_params(args: argparse.Namespace) -> int:
    d, v, L, s = args.dim, args.vocab, args.layers, args.seq
    block = 12 * d * d + 13 * d  # attn (4 d^2 + 4 d) + mlp (8 d^2 + 5 d) + 2 layer norms (4 d)
    return v * d + s * d + L * block + 2 * d + v * d  # wte, wpe, blocks, ln_f, lm_head (untied, no bias)


def theory_bytes(mode: str, psi: int, n: int) -> float:
    return {"ddp": 16 * psi, "zero2": 4 * psi + 12 * psi / n, "zero3": 16 * psi / n}[mode]


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from iterppo_lightning.cpu_deepspeed import CPUDeepSpeedStrategy

    class GPT(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None
            self.rss_before_model_kib = 0

        def setup(self, stage: str) -> None:
            self.rss_before_model_kib = _status_kib("VmRSS")

        def configure_model(self) -> None:
            if self.model is None:
                cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.dim, n_layer=args.layers,
                                 n_head=args.heads, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
                self.model = GPT2LMHeadModel(cfg)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

        def on_fit_end(self) -> None:
            trainer = self.trainer
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            local_params = sum(
                (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in self.model.parameters()
            )
            result = {
                "mode": args.worker,
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters()),
                "local_param_numel": local_params,
                "zero_stage": engine.zero_optimization_stage() if engine is not None else 0,
                "rss_before_model_mib": self.rss_before_model_kib / 1024,
                "vmhwm_mib": _status_kib("VmHWM") / 1024,
                "rss_end_mib": _status_kib("VmRSS") / 1024,
            }
            result["end_minus_before_mib"] = result["rss_end_mib"] - result["rss_before_model_mib"]
            result["peak_minus_before_mib"] = result["vmhwm_mib"] - result["rss_before_model_mib"]
            Path(args.worker_out, f"{args.worker}_rank{trainer.global_rank}.json").write_text(json.dumps(result))

    if args.worker == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        b = int(args.bucket)
        strategy = CPUDeepSpeedStrategy(stage=int(args.worker[-1]), reduce_bucket_size=b, allgather_bucket_size=b)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, args.vocab, (args.batch * args.procs * args.steps, args.seq), generator=g))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=args.procs, strategy=strategy, max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(GPT(), DataLoader(data, batch_size=args.batch))


def idle_rss_mib() -> float:
    code = (
        "import torch, lightning, deepspeed, transformers; "
        "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--bucket", type=float, default=5e6,
                   help="DeepSpeed reduce/allgather bucket size in elements (Lightning's default, 2e8, is 800 MB "
                        "fp32 and dwarfs a small model)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import tempfile

    psi = n_params(args)
    idle = idle_rss_mib()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
            for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
                env.pop(var, None)
            forwarded = [f"--{k}={getattr(args, k)}" for k in ("layers", "dim", "heads", "vocab", "seq", "batch",
                                                              "steps", "procs", "bucket")]
            cmd = [sys.executable, __file__, *forwarded, f"--worker={mode}", f"--worker-out={tmp}"]
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
            ranks = [json.loads(Path(tmp, f"{mode}_rank{r}.json").read_text()) for r in range(args.procs)]
            worst = max(ranks, key=lambda r: r["peak_minus_before_mib"])
            assert worst["params"] == psi, (worst["params"], psi)
            rows.append({
                "mode": mode,
                "theory_mib": theory_bytes(mode, psi, args.procs) / MiB,
                "measured_mib": worst["peak_minus_before_mib"],
                "vmhwm_mib": worst["vmhwm_mib"],
                "end_mib": worst["end_minus_before_mib"],
                "local_param_numel": worst["local_param_numel"],
                "wall_s": time.time() - t0,
                "ranks": ranks,
            })

    print(f"GPT-2 {args.layers}x{args.dim}, vocab {args.vocab}: {psi:,} params ({psi * 4 / MiB:.1f} MiB fp32), "
          f"AdamW, {args.procs} CPU processes, batch {args.batch}x{args.seq} per process, {args.steps} steps, "
          f"DeepSpeed buckets {args.bucket:.0e} elements")
    print(f"idle process RSS (torch+lightning+deepspeed+transformers imported): {idle:.0f} MiB")
    header = (f"{'mode':<6} {'theory MiB/proc':>16} {'measured peak MiB/proc':>23} {'at fit end':>11} "
              f"{'VmHWM MiB':>10} {'params held':>12} {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<6} {r['theory_mib']:>16.1f} {r['measured_mib']:>23.1f} {r['end_mib']:>11.1f} "
              f"{r['vmhwm_mib']:>10.0f} "
              f"{r['local_param_numel']:>12,} {r['wall_s']:>7.1f}")
    print("measured peak = VmHWM at fit end - VmRSS before configure_model; at fit end = VmRSS then - the same "
          "(rank with the larger peak); theory = 16 / 4+12/N / 16/N bytes x params for ddp / zero2 / zero3")
    result = {"params": psi, "idle_rss_mib": idle, "args": {k: v for k, v in vars(args).items()
                                                             if not k.startswith("worker")}, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}
                     | {"rows": [{k: v for k, v in r.items() if k != "ranks"} for r in rows]}))


if __name__ == "__main__":
    main()
