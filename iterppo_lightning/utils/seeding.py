"""The one place random seeds (and hash-based draws) are derived from a run's seed.

Every seed the project derives is a hash of its parts joined by ":" (the run
seed, then what the seed is for), never a draw from a random stream: the value
then depends only on those parts, not on how many draws came before, on batch
sizes, on the order things are loaded in, or on whether the process was
restarted. sha256 makes seeds of different parts independent in practice.
"""

from __future__ import annotations

import hashlib

__all__ = ["hash_bits", "derive_seed", "derive_uniform"]


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
