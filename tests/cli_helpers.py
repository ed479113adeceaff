"""Run the real `iterppo` command from tests: in a process of its own (run_cli) or in this one (run_inprocess)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

from cli_forkserver import ForkServer

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


# Set to 1 to start every command with a fresh interpreter (slower; the fork server's docstring says what differs).
COLD_START = os.environ.get("ITERPPO_TEST_COLD_START") == "1"
_server: ForkServer | None = None


def _fork_server() -> ForkServer:
    global _server
    if _server is None:
        scratch = Path(tempfile.mkdtemp(prefix="iterppo-cli-"))
        _server = ForkServer(ENV, scratch)
        atexit.register(lambda: (_server.close(), shutil.rmtree(scratch, ignore_errors=True)))
    return _server


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, cold: bool = False
) -> subprocess.CompletedProcess:
    """`iterppo ARGS` in a process of its own; `env` adds variables (e.g. a failpoint).

    The process is forked from a server that has already imported the package (cli_forkserver.py),
    which saves the seconds of start-up per command. `cold=True` (or ITERPPO_TEST_COLD_START=1 for every
    command) runs a plain subprocess: a fresh interpreter with its own hash seed.
    """
    full_env = {**ENV, **(env or {})}
    cmd = command()
    if cold or COLD_START or cmd[0] == sys.executable:  # no console script: nothing to imitate, run it plainly
        return subprocess.run([*cmd, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return _fork_server().run([*cmd, *args], cwd=REPO, env=full_env, timeout=timeout)


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


def fit_refused_before_any_work(config: Path, run_dir: Path, *flags: str) -> str:
    """`iterppo fit --config CONFIG --run_dir RUN_DIR FLAGS` must exit 2 without creating the run folder;
    returns its stderr (the message a user reads)."""
    proc = run_cli("fit", "--config", str(config), "--run_dir", str(run_dir), *flags)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not run_dir.exists()
    return proc.stderr


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
