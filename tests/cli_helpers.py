"""Run the real `iterppo` command from tests: as a subprocess (like a user's shell) or in-process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

# One intra-op thread: on a small shared CPU machine, torch's default thread count
# oversubscribes the cores (the smoke fit takes ~10 s with 1 thread, ~60 s without).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command() -> list[str]:
    script = Path(sys.executable).parent / "iterppo"
    if script.exists():
        return [str(script)]
    found = shutil.which("iterppo")
    return [found] if found else [sys.executable, "-m", "iterppo_lightning.cli"]


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`iterppo ARGS` in a subprocess; `env` adds variables (e.g. a failpoint)."""
    return subprocess.run([*command(), *args], cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def run_inprocess(capsys, *args: str) -> SimpleNamespace:
    """`main(args)` as a process would see it: (exit code, stdout, stderr)."""
    from iterppo_lightning.cli import main

    capsys.readouterr()
    code, trace = 0, ""
    argv, sys.argv = sys.argv, ["iterppo"]  # as if typed in a shell (pytest's own argv is not ours)
    try:
        main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # an uncaught exception would end the process with status 1
        code, trace = 1, traceback.format_exc()
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err + trace)


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Relative path -> content hash (or link target) of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out
