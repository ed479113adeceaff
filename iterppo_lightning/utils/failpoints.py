"""Fault injection for crash tests: die (SIGKILL) or poison a loss at a named point.

Resume is only as good as the crashes it was tested against, and a timed
external kill lands somewhere different on every machine. A failpoint names
the place instead, so a test can kill a real subprocess exactly there:

    ITERPPO_FAILPOINT=critic.step@3 iterppo fit ...          # SIGKILL at the 3rd critic step
    ITERPPO_FAILPOINT=critic.step@3:SIGTERM iterppo fit ...  # SIGTERM there instead (what `kill` sends)
    ITERPPO_INJECT_NAN=policy.loss@2 iterppo fit ...         # the 2nd PPO loss becomes NaN

`@N` (default 1) is the hit count within the process; `:SIGNAL` (default SIGKILL) the signal sent.
With neither variable set every call is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

KILL_ENV = "ITERPPO_FAILPOINT"
NAN_ENV = "ITERPPO_INJECT_NAN"

_hits: Counter[tuple[str, str]] = Counter()


def _armed(env: str, name: str) -> bool:
    spec = os.environ.get(env)
    if not spec:
        return False
    target, _, count = spec.partition(":")[0].partition("@")
    if target != name:
        return False
    _hits[(env, name)] += 1
    return _hits[(env, name)] == int(count or 1)


def failpoint(name: str) -> None:
    """SIGKILL (or the signal it names) this process here when ITERPPO_FAILPOINT names this point (and hit count)."""
    if _armed(KILL_ENV, name):
        sys.stdout.flush()
        sys.stderr.flush()
        signal_name = os.environ[KILL_ENV].partition(":")[2] or "SIGKILL"
        os.kill(os.getpid(), signal.Signals[signal_name])


def maybe_nan(name: str, value):
    """`value` (a tensor), or NaN of its shape when ITERPPO_INJECT_NAN names this point."""
    if _armed(NAN_ENV, name):
        return value * float("nan")
    return value
