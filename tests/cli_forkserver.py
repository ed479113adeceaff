"""A warm `iterppo` for tests: one process imports the CLI (torch, Lightning) once, then forks a child per command.

Most of a tiny run's wall time is Python start-up (torch, Lightning, transformers: seconds per
process), and the tests start dozens of runs. Each command here still runs in a process of its
own, so SIGKILL failpoints, exit codes and "resume in a new process" mean what they mean for a
user's shell; only the import is paid once. A child is forked from a process that has imported
the package and done nothing else (no torch op, no run), so no state of an earlier command can
leak into a later one: every command starts from the same freshly imported interpreter.

What differs from `exec`ing the `iterppo` script:
- environment variables read at *import* time are those of the server (started with cli_helpers.ENV); the
  package reads its own variables (ITERPPO_FAILPOINT, ITERPPO_INJECT_NAN) when a point is reached, and
  Lightning's rank variables are unset in a launching process;
- every child of one server shares its hash seed (PYTHONHASHSEED) and memory layout, where a new process
  would draw its own. So a test that compares a resumed run with an uninterrupted one makes the
  uninterrupted reference in a fresh interpreter (`run_cli(..., cold=True)`): an outcome that depends on
  set or dict order under string hashing then shows up as a difference.
The import path is the console script's: the server drops this tests/ folder from `sys.path`, so a child
cannot import a test helper the installed `iterppo` could not. Processes a command starts itself (a second
DeepSpeed rank, the runs of a sweep) are ordinary `exec`s. Set ITERPPO_TEST_COLD_START=1 to run every command
as a plain subprocess instead (cli_helpers.run_cli).

The server runs in a session of its own; closing the client (or a protocol error, or a timeout) kills the
server's whole process group, so an interrupted test run leaves no server and no half-finished command behind.

Protocol (one JSON object a line): the client writes {"argv", "env", "cwd", "stdout", "stderr"};
the server answers {"pid"} when the child exists, then {"status"} (os.waitpid's) when it ended.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- the server (its own process) ---------------------------------------------------------------------------


def _child(request: dict) -> None:
    """Become `argv` as a process would run it; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((devnull, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.argv = list(request["argv"])
        try:
            from iterppo_lightning.cli import main

            main()  # as the console script does: `sys.exit(main())`, arguments from sys.argv
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): printed, status 1 (as the interpreter does)
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # What the interpreter does on the way out: join non-daemon threads, run atexit handlers, flush.
        import atexit
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    """Import the CLI, then run one command per request line on stdin until stdin closes."""
    # The import path of the `iterppo` console script: not this tests/ folder (python put it first for this
    # script), so a child cannot import a test helper (tiny_chat, cli_helpers) that a user's process could not.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import importlib

    from iterppo_lightning import cli

    # What every training subcommand imports first (torch, Lightning, transformers): seconds a command.
    training_entry = getattr(cli, "_LIGHTNING", "")
    if training_entry:
        importlib.import_module(training_entry.partition(":")[0])

    # The protocol moves to private descriptors: fds 0, 1 and 2 are what every child re-points.
    requests, replies = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print of the server goes to its stderr, never into the replies
    os.close(devnull)
    # What a run imports on its way (most of a second): deepspeed (accelerate's unwrap_model, at the first
    # policy save, whenever it is installed), peft, and matplotlib's renderer (the learning curve). After the
    # protocol moved: deepspeed prints its accelerator guess on import.
    for name in ("deepspeed", "peft", "matplotlib.backends.backend_agg"):
        importlib.import_module(name)
    replies.write(json.dumps({"ready": os.getpid()}) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": status}) + "\n")
        replies.flush()


# -- the client (in the test process) ---------------------------------------------------------------------------


class ForkServer:
    """Starts the server on first use; `run` is subprocess.run(capture_output=True, text=True) for `argv`."""

    def __init__(self, env: dict[str, str], scratch: Path):
        self.env, self.scratch, self.proc, self.count = env, scratch, None, 0

    def _start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.log = self.scratch / "server.log"  # the server's own stderr (import warnings, a crash)
        # pyarrow's jemalloc starts a background thread at import; the system allocator keeps the server to the
        # threads torch starts, which hold no lock across a fork.
        env = {**self.env, "ARROW_DEFAULT_MEMORY_POOL": "system"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve"],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True,  # one process group: close() ends the server and any command still running
            )  # fmt: skip
        self.pending = b""
        ready = self._reply(timeout=300)
        assert "ready" in ready, ready

    def _reply(self, timeout: float) -> dict:
        # Unbuffered reads: a buffered readline could swallow the next reply, which select would then wait for.
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                tail = self.log.read_text()[-3000:]
                raise RuntimeError(f"the test fork server exited (status {self.proc.wait()}):\n{tail}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            return self._run(argv, cwd, env, timeout)
        except BaseException:
            # A timeout, an interrupt or a broken reply leaves the protocol out of step: start afresh next time.
            self._kill()
            raise

    def _run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = dict(argv=list(argv), env=env, cwd=str(cwd), stdout=str(out), stderr=str(err))
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = self._reply(timeout=60)["pid"]
        try:
            status = self._reply(timeout=deadline - time.monotonic())["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text()) from None
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        result = subprocess.CompletedProcess(argv, returncode, out.read_text(), err.read_text())
        out.unlink()
        err.unlink()
        return result

    def _kill(self) -> None:
        """End the server's process group (the server, a running command and whatever that command started)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the server ends after the command it runs, if any
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._kill()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
