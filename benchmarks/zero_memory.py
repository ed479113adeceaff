"""Memory per process of a GPT-2 + AdamW fit on 2 CPU processes: DDP (no sharding) vs ZeRO-2 vs ZeRO-3.

What runs
---------
For each mode, one `lightning.Trainer(accelerator="cpu", devices=--procs, max_steps=--steps)` fit of a GPT-2
(`--layers` x `--dim`, `--vocab` tokens, untied LM head; ~69 M parameters by default) built in
`configure_model()` (so under ZeRO-3 it is created already partitioned by `deepspeed.zero.Init`), trained in fp32
with `torch.optim.AdamW` on random tokens (`--batch` sequences of `--seq` tokens per process):

* `ddp`:   `DDPStrategy(process_group_backend="gloo", gradient_as_bucket_view=True)`: every process holds
  everything (`--no-ddp-bucket-view` gives the stock DDP, whose reducer keeps its buckets as a second copy of
  the gradients, +4 bytes/param);
* `zero2`: `CPUDeepSpeedStrategy` with ZeRO stage 2: gradients and optimizer states sharded;
* `zero3`: `CPUDeepSpeedStrategy` with ZeRO stage 3: parameters sharded too.

The DeepSpeed `zero_optimization` settings are explicit (printed, and stored in the JSON): bucket sizes,
`overlap_comm`, `stage3_prefetch_bucket_size`, `stage3_max_live_parameters`, `stage3_max_reuse_distance`,
`stage3_param_persistence_threshold` (0 by default: no parameter is kept whole on every rank).

Lightning's own launcher starts the second process; each mode is a fresh pair of processes (this script runs
itself with `--worker MODE`). Modes run one after the other, never at the same time.

What is measured (per process; model state of the rank holding the most, RSS columns the larger of the ranks)
-------------------------------------------------------------------------------------------------------------
1. **Model state**, the quantity the ZeRO formulas are about: bytes of the live tensors that hold this rank's
   parameters, gradients and Adam states, counted from the objects themselves inside the last optimizer step
   (a `register_step_post_hook` on the AdamW that DeepSpeed steps: parameters, gradients and both Adam moments
   are all alive there). Tensors are de-duplicated by storage, so views into DeepSpeed's flat buffers count once:
   * params: `p.data` (DDP, ZeRO-2: the full flat buffer), `p.ds_tensor` (ZeRO-3: this rank's partition);
   * grads: `p.grad` (DDP: views into the reducer buckets), DeepSpeed's gradient partition buffer
     (`grad_partitions_flat_buffer`, ZeRO-3); ZeRO-2 has released its `grads_in_partition` buffer by then, and
     its only gradient is the flat fp32 partition gradient it builds for the inner step (`.grad` of the
     partition AdamW steps), which is counted here;
   * Adam: `exp_avg`, `exp_avg_sq` (and the scalar `step`) in the AdamW state.
   Reported next to it, not in it, what DeepSpeed 0.19 holds on top in fp32 training:
   * fp32 master: the flat fp32 partition AdamW steps. ZeRO-1/2 always clone it from the parameters
     (`single_partition_of_fp32_groups`), +4 bytes/param/N even though the parameters are fp32 already. ZeRO-3
     means to reuse its partition when dtype and device match, but compares `tensor.device` with the string
     `"cpu"` (`get_accelerator().current_device_name()`), which is never equal, so it clones too;
   * step grad: ZeRO-3 flattens its gradient partitions into a second fp32 copy for the step (+4 bytes/param/N,
     freed after the step);
   * gathered: full parameters gathered at that moment (ZeRO-3; none with these settings);
   * other: every other live tensor Python can see (named from the DeepSpeed optimizer's attributes, then a
     gc walk): ZeRO-3's reduce bucket (`reduce_bucket_size` x 4 bytes), the batch, ... Tensors that only C++
     holds (autograd's saved activations, a stock DDP reducer's buckets) are not seen, but by the optimizer
     step the activations are gone.
2. **RSS**: `VmRSS` at that moment and two peaks (`VmHWM`), all minus `VmRSS` in `LightningModule.setup()`
   (imports done, process group up, no model yet): the peak of setup (building the model, DDP/DeepSpeed
   wrapping; `VmHWM` read in `on_train_start`) and the peak of the training steps (`VmHWM` reset in
   `on_train_start` by writing 5 to `/proc/self/clear_refs`, read in `on_fit_end`). Next to it glibc's own
   account (`mallinfo2`, all arenas, minus its value in `setup()`): bytes in use, and bytes freed but kept by
   the allocator, at the step; and the RSS at the end of fit before and after `malloc_trim(0)`. RSS minus the
   tensors is mostly what glibc keeps: blocks under its mmap threshold (raised to the size of each freed mmapped
   block, up to 32 MiB) come from the heap, and freed heap blocks go back to the OS only from the heap's top.
   `--malloc-mmap-threshold` fixes the threshold for the workers (`MALLOC_MMAP_THRESHOLD_`) to show that.

Theory (fp32, P parameters, N processes): unsharded 16 P bytes (4 params + 4 grads + 8 Adam m and v);
ZeRO-2: 4 P + 12 P / N; ZeRO-3: 16 P / N.

    OMP_NUM_THREADS=1 python benchmarks/zero_memory.py --out runs/zero_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MODES = ("ddp", "zero2", "zero3")
MiB = 2**20
# Census categories, in the order they claim storages (a storage counts once, under the first one that sees it).
STATE = ("params", "grads", "adam")
EXTRA = ("fp32_master", "step_grad_copy", "gathered_params", "other_tensors")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def malloc_mib() -> dict:
    """glibc's view, all arenas: bytes handed out (heap chunks + mmapped chunks) and freed heap bytes it keeps."""
    m = _libc().mallinfo2()
    return {"in_use": (m.uordblks + m.hblkhd) / MiB, "free_kept": m.fordblks / MiB}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def n_params(args: argparse.Namespace) -> int:
    d, v, L, s = args.dim, args.vocab, args.layers, args.seq
    block = 12 * d * d + 13 * d  # attn (4 d^2 + 4 d) + mlp (8 d^2 + 5 d) + 2 layer norms (4 d)
    return v * d + s * d + L * block + 2 * d + v * d  # wte, wpe, blocks, ln_f, lm_head (untied, no bias)


def theory_bytes(mode: str, psi: int, n: int) -> float:
    return {"ddp": 16 * psi, "zero2": 4 * psi + 12 * psi / n, "zero3": 16 * psi / n}[mode]


def deepspeed_config(args: argparse.Namespace, stage: int) -> dict:
    b = int(args.bucket)
    zero = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": args.overlap_comm,
        "reduce_scatter": True,
        "allgather_partitions": True,
        "reduce_bucket_size": b,
        "allgather_bucket_size": b,
        "sub_group_size": 1_000_000_000_000,
    }
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": int(args.prefetch_bucket),
            "stage3_max_live_parameters": int(args.max_live_params),
            "stage3_max_reuse_distance": int(args.max_reuse_distance),
            "stage3_param_persistence_threshold": int(args.persistence_threshold),
        }
    return {"zero_allow_untested_optimizer": True, "zero_optimization": zero}


def census(model, inner_opt, zero_opt) -> dict:
    """Bytes of live tensors per category, de-duplicated by storage (see the module docstring)."""
    import gc

    import torch

    seen: set[int] = set()
    out = {c: 0 for c in STATE + EXTRA}
    largest_other: dict[str, int] = {}

    def claim(obj, cat: str, name: str = "", depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                return
            st = obj.untyped_storage()
            ptr, nb = st.data_ptr(), st.nbytes()
            if ptr == 0 or nb == 0 or ptr in seen:
                return
            seen.add(ptr)
            out[cat] += nb
            if cat == "other_tensors" and name:
                largest_other[name] = largest_other.get(name, 0) + nb
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for i, x in enumerate(obj):
                claim(x, cat, f"{name}[{i}]" if name else "", depth + 1)
        elif depth < 3 and isinstance(obj, dict):
            for k, x in obj.items():
                claim(x, cat, f"{name}[{k!r}]" if name else "", depth + 1)

    params = list(model.parameters())
    for p in params:  # what this rank holds of the parameters
        claim(p.ds_tensor if hasattr(p, "ds_tensor") else p.data, "params")
    for p in params:
        claim(p.grad, "grads")
    if zero_opt is not None:
        for attr in ("grads_in_partition", "grad_partitions_flat_buffer", "averaged_gradients"):
            claim(getattr(zero_opt, attr, None), "grads")
    for state in inner_opt.state.values():
        claim(state, "adam")
    inner = [q for g in inner_opt.param_groups for q in g["params"]]
    for q in inner:  # ZeRO's flat fp32 partitions; for DDP the model parameters again (already counted)
        claim(q, "fp32_master")
    for q in inner:  # the flat fp32 gradient DeepSpeed builds for the step: a copy unless it is the only one
        claim(q.grad, "step_grad_copy" if out["grads"] else "grads")
    for p in params:  # ZeRO-3: full parameters gathered at this moment (or persistent ones)
        if hasattr(p, "ds_tensor"):
            claim(p.data, "gathered_params")
    if zero_opt is not None:  # name DeepSpeed's own buffers
        for attr, val in vars(zero_opt).items():
            if attr == "optimizer":
                continue
            if hasattr(val, "buffer") and not isinstance(val, torch.Tensor):
                val = vars(val)
            if isinstance(val, dict) and any(hasattr(v, "buffer") for v in val.values()):  # {dtype: IPGBucket}
                val = {k: getattr(v, "buffer", v) for k, v in val.items()}
            claim(val, "other_tensors", attr)
    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            claim(obj, "other_tensors", "(unnamed: found by gc)")
    out["largest_other_named"] = dict(sorted(largest_other.items(), key=lambda kv: -kv[1])[:6])
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from iterppo_lightning.distributed.cpu_deepspeed import CPUDeepSpeedStrategy

    class GPT(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None
            self.mem: dict = {}
            self.census: dict = {}
            self.steps_seen = 0

        def setup(self, stage: str) -> None:
            self.mem["rss_before_model_kib"] = _status_kib("VmRSS")
            self.mem["malloc_before_model"] = malloc_mib()

        def configure_model(self) -> None:
            if self.model is None:
                cfg = GPT2Config(
                    vocab_size=args.vocab,
                    n_positions=args.seq,
                    n_embd=args.dim,
                    n_layer=args.layers,
                    n_head=args.heads,
                    tie_word_embeddings=False,
                    bos_token_id=0,
                    eos_token_id=0,
                )
                self.model = GPT2LMHeadModel(cfg)
                self.mem["rss_after_model_kib"] = _status_kib("VmRSS")

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-4)
            opt.register_step_post_hook(self._after_inner_step)
            return opt

        def _after_inner_step(self, opt, *_args) -> None:
            # DeepSpeed steps this same AdamW (its param_groups replaced by the flat fp32 partitions).
            self.steps_seen += 1
            if self.steps_seen < args.steps:
                return
            t0 = time.time()
            engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
            self.census = census(self.model, opt, engine.optimizer if engine is not None else None)
            self.census["rss_kib"] = _status_kib("VmRSS")
            self.census["malloc"] = malloc_mib()
            self.census["seconds"] = time.time() - t0

        def on_train_start(self) -> None:
            self.mem["rss_train_start_kib"] = _status_kib("VmRSS")
            self.mem["hwm_setup_kib"] = _status_kib("VmHWM")
            self.mem["hwm_reset"] = _reset_peak_rss()

        def on_fit_end(self) -> None:
            trainer = self.trainer
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            before = self.mem["rss_before_model_kib"] / 1024
            m0 = self.mem["malloc_before_model"]
            c = self.census
            rss_end = _status_kib("VmRSS") / 1024 - before
            hwm = _status_kib("VmHWM") / 1024
            malloc_end = malloc_mib()
            _libc().malloc_trim(0)  # measurements are done: how much of the RSS was freed memory glibc kept?
            rss_trimmed = _status_kib("VmRSS") / 1024 - before
            result = {
                "mode": args.worker,
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters()),
                "local_param_numel": sum(
                    (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in self.model.parameters()
                ),
                "zero_stage": engine.zero_optimization_stage() if engine is not None else 0,
                "census_bytes": {k: v for k, v in c.items() if k in STATE + EXTRA},
                "model_state_bytes": sum(c[k] for k in STATE),
                "largest_other_tensors_bytes": c["largest_other_named"],
                "census_seconds": c["seconds"],
                "rss_before_model_mib": before,
                "rss_after_model_mib": self.mem["rss_after_model_kib"] / 1024 - before,
                "rss_train_start_mib": self.mem["rss_train_start_kib"] / 1024 - before,
                "rss_at_step_mib": c["rss_kib"] / 1024 - before,
                "peak_setup_mib": self.mem["hwm_setup_kib"] / 1024 - before,
                "peak_train_mib": (hwm - before) if self.mem["hwm_reset"] else None,
                "vmhwm_mib": hwm,
                "malloc_in_use_at_step_mib": c["malloc"]["in_use"] - m0["in_use"],
                "malloc_free_kept_at_step_mib": c["malloc"]["free_kept"] - m0["free_kept"],
                "rss_end_mib": rss_end,
                "malloc_in_use_end_mib": malloc_end["in_use"] - m0["in_use"],
                "malloc_free_kept_end_mib": malloc_end["free_kept"] - m0["free_kept"],
                "rss_end_after_malloc_trim_mib": rss_trimmed,
            }
            Path(args.worker_out, f"{args.worker}_rank{trainer.global_rank}.json").write_text(json.dumps(result))

    if args.worker == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo", gradient_as_bucket_view=args.ddp_bucket_view)
    else:
        strategy = CPUDeepSpeedStrategy(config=deepspeed_config(args, int(args.worker[-1])))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, args.vocab, (args.batch * args.procs * args.steps, args.seq), generator=g))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.procs,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
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


FORWARDED = (
    "layers",
    "dim",
    "heads",
    "vocab",
    "seq",
    "batch",
    "steps",
    "procs",
    "bucket",
    "prefetch_bucket",
    "max_live_params",
    "max_reuse_distance",
    "persistence_threshold",
)


def print_table(rows: list[dict], columns: list[tuple[str, int, str, str]]) -> None:
    """One header line, a rule, one line per row: columns are (header, width, row key, format spec)."""

    def cell(value, width: int, spec: str) -> str:
        if spec == "<":
            return f"{value:<{width}}"
        return f"{value:>{width}{spec}}"

    header = " ".join(f"{h:<{w}}" if spec == "<" else f"{h:>{w}}" for h, w, _, spec in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        r = {**r, "state_over_theory": r["model_state_mib"] / r["theory_mib"]}
        print(" ".join(cell(r[key], w, spec) for _, w, key, spec in columns))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="sequences per process per step")
    p.add_argument("--steps", type=int, default=2, help="the census is taken inside the last optimizer step")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument(
        "--bucket",
        type=float,
        default=5e6,
        help="DeepSpeed reduce/allgather bucket size in elements (Lightning's default, 2e8, is 800 MB "
        "fp32 and dwarfs a small model)",
    )
    p.add_argument("--prefetch-bucket", type=float, default=5e6, help="stage3_prefetch_bucket_size (elements)")
    p.add_argument("--max-live-params", type=float, default=1e7, help="stage3_max_live_parameters (elements)")
    p.add_argument("--max-reuse-distance", type=float, default=1e7, help="stage3_max_reuse_distance (elements)")
    p.add_argument(
        "--persistence-threshold",
        type=float,
        default=0,
        help="stage3_param_persistence_threshold: parameters with at most this many elements stay whole "
        "on every rank (DeepSpeed's default is 1e5)",
    )
    p.add_argument(
        "--overlap-comm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="DeepSpeed overlap_comm (Lightning's default: on; ZeRO-2 then keeps two reduce buckets; "
        "there are no streams to overlap with on CPU)",
    )
    p.add_argument(
        "--ddp-bucket-view",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DDP gradient_as_bucket_view (off: the reducer keeps its buckets as a second gradient copy)",
    )
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="if > 0, set MALLOC_MMAP_THRESHOLD_ (bytes) for the workers: glibc then serves every block "
        "at least this large with its own mmap and unmaps it on free, so RSS follows the live "
        "memory (default 0: glibc's dynamic threshold, which grows to 32 MiB and keeps freed blocks)",
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import tempfile

    t_start = time.time()
    psi = n_params(args)
    idle = idle_rss_mib()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
            for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_DEEPSPEED_CONFIG_PATH"):
                env.pop(var, None)
            if args.malloc_mmap_threshold > 0:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FORWARDED]
            forwarded += [
                "--overlap-comm" if args.overlap_comm else "--no-overlap-comm",
                "--ddp-bucket-view" if args.ddp_bucket_view else "--no-ddp-bucket-view",
            ]
            cmd = [sys.executable, __file__, *forwarded, f"--worker={mode}", f"--worker-out={tmp}"]
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
            ranks = [json.loads(Path(tmp, f"{mode}_rank{r}.json").read_text()) for r in range(args.procs)]
            assert all(r["params"] == psi for r in ranks), ([r["params"] for r in ranks], psi)
            worst = max(ranks, key=lambda r: r["model_state_bytes"])

            def top(key: str, ranks: list[dict] = ranks) -> float:
                return max(r[key] for r in ranks) if all(r[key] is not None for r in ranks) else float("nan")

            rows.append(
                {
                    "mode": mode,
                    "theory_mib": theory_bytes(mode, psi, args.procs) / MiB,
                    "model_state_mib": worst["model_state_bytes"] / MiB,
                    **{f"{k}_mib": worst["census_bytes"][k] / MiB for k in STATE + EXTRA},
                    "tensors_mib": sum(worst["census_bytes"].values()) / MiB,
                    "malloc_in_use_at_step_mib": top("malloc_in_use_at_step_mib"),
                    "malloc_free_kept_at_step_mib": top("malloc_free_kept_at_step_mib"),
                    "rss_at_step_mib": top("rss_at_step_mib"),
                    "peak_setup_mib": top("peak_setup_mib"),
                    "peak_train_mib": top("peak_train_mib"),
                    "vmhwm_mib": top("vmhwm_mib"),
                    "rss_end_mib": top("rss_end_mib"),
                    "rss_end_after_malloc_trim_mib": top("rss_end_after_malloc_trim_mib"),
                    "local_param_numel": worst["local_param_numel"],
                    "wall_s": time.time() - t0,
                    "ranks": ranks,
                }
            )

    n = args.procs
    print(
        f"GPT-2 {args.layers}x{args.dim}, vocab {args.vocab}: {psi:,} params ({psi * 4 / MiB:.1f} MiB fp32), "
        f"fp32 AdamW, {n} CPU processes, batch {args.batch}x{args.seq} per process, {args.steps} steps"
    )
    print(
        f"DDP: gradient_as_bucket_view={args.ddp_bucket_view}; MALLOC_MMAP_THRESHOLD_="
        f"{args.malloc_mmap_threshold or 'unset (glibc default)'}"
    )
    for stage in (2, 3):
        if f"zero{stage}" in args.modes:
            print(f"ZeRO-{stage}: {json.dumps(deepspeed_config(args, stage)['zero_optimization'])}")
    print(f"idle process RSS (torch+lightning+deepspeed+transformers imported): {idle:.0f} MiB")
    print("\nModel state per process, MiB (live tensors inside the last optimizer step, rank with the most):")
    print_table(
        rows,
        [
            ("mode", 6, "mode", "<"),
            ("theory", 8, "theory_mib", ".1f"),
            ("params", 8, "params_mib", ".1f"),
            ("grads", 8, "grads_mib", ".1f"),
            ("adam", 8, "adam_mib", ".1f"),
            ("=state", 8, "model_state_mib", ".1f"),
            ("state/th", 8, "state_over_theory", ".3f"),
            ("| +fp32 master", 14, "fp32_master_mib", ".1f"),
            ("+step grad", 10, "step_grad_copy_mib", ".1f"),
            ("+gathered", 9, "gathered_params_mib", ".1f"),
            ("+other", 7, "other_tensors_mib", ".1f"),
            ("params held", 12, "local_param_numel", ","),
        ],
    )
    print("\nRSS per process, MiB above VmRSS before the model was built (max over ranks):")
    print_table(
        rows,
        [
            ("mode", 6, "mode", "<"),
            ("theory", 7, "theory_mib", ".0f"),
            ("tensors", 8, "tensors_mib", ".0f"),
            ("malloc used", 11, "malloc_in_use_at_step_mib", ".0f"),
            ("malloc kept", 11, "malloc_free_kept_at_step_mib", ".0f"),
            ("RSS at step", 11, "rss_at_step_mib", ".0f"),
            ("peak setup", 10, "peak_setup_mib", ".0f"),
            ("peak train", 10, "peak_train_mib", ".0f"),
            ("RSS end", 8, "rss_end_mib", ".0f"),
            ("trimmed", 8, "rss_end_after_malloc_trim_mib", ".0f"),
            ("wall s", 7, "wall_s", ".1f"),
        ],
    )
    print(
        f"theory = 16 / 4+12/N / 16/N bytes x params (ddp / zero2 / zero3), N = {n}; state = params + grads + Adam "
        "m,v; tensors = all tensors counted at the step (state + extras); malloc used / kept = glibc bytes in use "
        "/ freed but kept, at the step; peak setup = building the model + DDP/DeepSpeed init; peak train = the "
        f"{args.steps} steps; trimmed = RSS at the end after malloc_trim(0)"
    )
    wall = time.time() - t_start
    print(f"total wall time {wall:.0f} s")
    result = {
        "params": psi,
        "idle_rss_mib": idle,
        "wall_s": wall,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "deepspeed_zero_optimization": {f"zero{s}": deepspeed_config(args, s)["zero_optimization"] for s in (2, 3)},
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
