"""A number-guessing game written against the environment protocol (docs/environments.md), as a user would.

Tests give it to the CLI by class_path (`guess_env.NumberGuess`: tests/ is on the import path under pytest).
"""

from __future__ import annotations

import random
import re


class NumberGuess:
    """Guess a number in [low, high] within `max_turns` messages; the game says higher or lower."""

    def __init__(self, low: int = 1, high: int = 4, max_turns: int = 3) -> None:
        self.low, self.high, self.max_turns = low, high, max_turns

    def reset(self, seed: int) -> tuple[str, dict]:
        self.target = random.Random(seed).randint(self.low, self.high)
        self.turns = 0
        return f"guess a number from {self.low} to {self.high} .", {"target": self.target}

    def step(self, agent_message: str) -> tuple[str, int, bool]:
        self.turns += 1
        numbers = [int(n) for n in re.findall(r"\d+", agent_message)]
        if numbers and numbers[0] == self.target:
            return "correct , you win !", 1, True
        if not numbers:
            hint = "say a number ."
        else:
            hint = "higher ." if numbers[0] < self.target else "lower ."
        done = self.turns >= self.max_turns
        return (f"{hint} game over ." if done else hint), 0, done
