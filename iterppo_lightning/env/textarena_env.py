"""textarena's single-player games behind the environment protocol (env/protocol.py), for `model.environment_class`.

textarena (the optional extra: `pip install 'iterppo-lightning[textarena]'`) is a collection of multi-turn text
games. A single-player game talks to one player: after `reset` the game's prompt is the opening message, each
agent message is the player's move, and the game's answers ("The target number is higher.", an invalid-move
notice) are the next message. The episode's outcome is 1 when the game's final reward reaches `success_reward`
(a win; GuessTheNumber pays 1 for the right number, a fraction for getting close), else 0.

    model:
      environment_class:
        class_path: iterppo_lightning.env.textarena_env.TextArenaGame
        init_args: {env_id: GuessTheNumber-v0}

textarena seeds Python's global `random` in `reset` and draws from it; this adapter keeps the process's global
random state as it was, so a run's other numbers do not depend on the games played.
"""

from __future__ import annotations

import random
from typing import Any


def _textarena():
    try:
        import textarena
    except ImportError:
        raise ImportError(
            "model.environment_class TextArenaGame needs textarena: pip install 'iterppo-lightning[textarena]'"
        ) from None
    return textarena


class _KeepGlobalRandom:
    """Restore Python's global random state on exit (textarena reseeds and draws from it)."""

    def __enter__(self) -> None:
        self.state = random.getstate()

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.state)


class TextArenaGame:
    """One textarena single-player game per instance (the run makes one instance per episode)."""

    def __init__(self, env_id: str = "GuessTheNumber-v0", success_reward: float = 1.0, **game_args: Any) -> None:
        """
        Args:
            env_id: a registered single-player game, e.g. GuessTheNumber-v0 (textarena's registry ids); the
                game is made without textarena's observation wrappers, so each message is what is new.
            success_reward: the final reward at or above which the episode counts as a success.
            game_args: the game's own settings (e.g. min_number, max_number, max_turns for GuessTheNumber).
        """
        textarena = _textarena()
        raw_id = env_id if env_id.endswith("-raw") else f"{env_id}-raw"
        self.env_id = env_id
        self.success_reward = success_reward
        self.game = textarena.make(raw_id, **game_args)
        self.observation_types = textarena.ObservationType

    def _new_messages(self) -> str:
        """What the game told the player since its last move (its prompt, hints, notices), one line each."""
        _player, observations = self.game.get_observation()
        lines = [message for _sender, message, kind in observations if kind != self.observation_types.PLAYER_ACTION]
        return "\n".join(line.strip() for line in lines if line.strip())

    def reset(self, seed: int) -> tuple[str, dict]:
        with _KeepGlobalRandom():
            self.game.reset(num_players=1, seed=seed)
            opening = self._new_messages()
        return opening, {"game": self.env_id}

    def step(self, agent_message: str) -> tuple[str, int, bool]:
        with _KeepGlobalRandom():
            done, _info = self.game.step(agent_message)
            message = self._new_messages()
            if not done:
                return message, 0, False
            rewards, game_info = self.game.close()
        reward = float((rewards or {}).get(0, 0.0))
        reason = (game_info or {}).get(0, {}).get("reason")
        final = "\n".join(part for part in (message, reason) if part)
        return final or "The game is over.", int(reward >= self.success_reward), True
