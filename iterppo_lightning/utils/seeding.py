"""The one place random seeds (and hash-based draws) are derived from a run's seed.

Two kinds of derivation live here, and nowhere else:

- **Hash-based** (`hash_bits`, `derive_seed`, `derive_uniform`): sha256 of the
  parts joined by ":" (the run seed, then what the seed is for). The value depends
  only on those parts, not on how many draws came before, on batch sizes, on the
  order things are loaded in, or on whether the process was restarted; sha256
  makes seeds of different parts independent in practice. Every seed of the
  training loop (each step's reseed, the episode seeds of collection, evaluation
  and imagined conversations, validation splits, bootstrap counts) is one of these.
- **Seeded streams and arithmetic seeds** (`tiny_model_seed`, `scripted_episode_seed`,
  `scripted_agent_rng`, `ope_sample_rng`, `imagine_outcome_rng`): older derivations
  kept exactly as they were, because changing them would change the customers,
  initial weights and samples of every run seeded before. Each is a function of
  its arguments alone (a fresh `random.Random` per call, never a shared stream), so
  they are as reproducible as the hash-based ones; they are only less independent
  across nearby seeds. Their docstrings say what each depends on.

Code that receives a seed (e.g. the simulator's `Random(seed)` for one episode)
may draw from it freely; deriving a new seed from a run's seed happens here.
"""

from __future__ import annotations

import hashlib
import random

__all__ = [
    "hash_bits",
    "derive_seed",
    "derive_uniform",
    "tiny_model_seed",
    "scripted_episode_seed",
    "scripted_agent_rng",
    "ope_sample_rng",
    "imagine_outcome_rng",
]


def hash_bits(*parts: object, bits: int) -> int:
    """The first `bits` bits (a multiple of 8, at most 256) of sha256 of the parts joined by ":", as an int.

    Each part is formatted as in an f-string (``str`` for ints and strings).
    """
    if bits % 8 or not 0 < bits <= 256:
        raise ValueError(f"bits must be a multiple of 8 in [8, 256], got {bits}")
    digest = hashlib.sha256(":".join(f"{part}" for part in parts).encode()).digest()
    return int.from_bytes(digest[: bits // 8], "big")


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**31) for `parts` (e.g. ``derive_seed(seed, iteration, "critic")``); valid for every RNG."""
    return hash_bits(*parts, bits=32) & 0x7FFFFFFF


def derive_uniform(*parts: object) -> float:
    """A uniform draw in [0, 1) for `parts`: 53 hash bits, so every value is exact in float64."""
    return (hash_bits(*parts, bits=64) >> 11) / 2**53


# ---------------------------------------------------------------------------
# Seeded streams and arithmetic seeds (kept as they were: see the module docstring)
# ---------------------------------------------------------------------------


def tiny_model_seed(seed: int) -> int:
    """Initial-weight seed of the bootstrap's tiny model in a run seeded `seed`: the first
    ``randrange(2**31)`` of ``random.Random(seed)``."""
    return random.Random(seed).randrange(2**31)


def scripted_episode_seed(seed: int, index: int) -> int:
    """Simulator seed of a scripted agent's episode `index` in a measurement seeded `seed`:
    ``seed * 1_000_003 + index``. The large prime stride keeps runs with nearby seeds from sharing episodes."""
    return seed * 1_000_003 + index


def scripted_agent_rng(episode_seed: int) -> random.Random:
    """A scripted agent's stream for the episode seeded `episode_seed`: ``random.Random(f"agent-{episode_seed}")``.

    A string seed hashes deterministically (not via PYTHONHASHSEED) and keeps the
    agent's stream distinct from the episode's own ``Random(episode_seed)``.
    """
    return random.Random(f"agent-{episode_seed}")


def ope_sample_rng(iteration: int) -> random.Random:
    """The stream that picks the off-policy estimate's opening states: ``random.Random(iteration)``.

    It depends on the iteration only, not on the run seed: runs with different
    seeds sample their (different) logged states with the same stream.
    """
    return random.Random(iteration)


def imagine_outcome_rng(seed: int) -> random.Random:
    """The stream that draws imagined dialogues' outcome labels: ``random.Random(seed)`` of the config's seed."""
    return random.Random(seed)
