"""textarena's GuessTheNumber behind the environment protocol (the optional extra; skipped without it)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("textarena", reason="textarena is an optional extra: pip install 'iterppo-lightning[textarena]'")

from iterppo_lightning.env.protocol import ProtocolEnvironment  # noqa: E402
from iterppo_lightning.env.textarena_env import TextArenaGame  # noqa: E402

SMALL = {"env_id": "GuessTheNumber-v0", "min_number": 1, "max_number": 10, "max_turns": 3}


def target_of(episode) -> int:
    return episode.environment.game.game_number  # the raw game (no wrappers) keeps its secret here


def test_a_won_game_is_one_success_and_the_hints_are_the_next_messages():
    environment = ProtocolEnvironment(TextArenaGame, SMALL)
    episode = environment.new_episode(5, "g5")
    target = target_of(episode)
    wrong = 1 if target != 1 else 2
    assert "Guess The Number" in episode.conversation.turns[0].customer
    episode.step(f"[{wrong}]")
    assert not episode.done
    assert episode.conversation.turns[-1].customer == f"The target number is {'higher' if wrong < target else 'lower'}."
    episode.step(f"my guess is [{target}]")
    conv = episode.conversation
    assert episode.done and conv.success and [t.outcome for t in conv.turns] == [0, 0, 1]
    assert "Congratulations" in conv.turns[-1].customer and conv.turns[-1].terminal
    assert conv.metadata == {"persona": {"game": "GuessTheNumber-v0"}, "seed": 5}


def test_running_out_of_guesses_is_a_failure_even_when_the_reward_is_partial():
    environment = ProtocolEnvironment(TextArenaGame, SMALL)
    episode = environment.new_episode(9, "g9")
    target = target_of(episode)
    # textarena checks the turn limit before it counts the move: max_turns 3 allows 4 guesses.
    for guess in [n for n in range(1, 11) if n != target][:4]:
        episode.step(f"[{guess}]")
    assert episode.done and not episode.conversation.success
    assert "turn limit" in episode.conversation.turns[-1].customer


def test_the_seed_picks_the_game_and_the_global_random_state_is_left_alone():
    environment = ProtocolEnvironment(TextArenaGame, SMALL)
    random.seed(123)
    expected = random.Random(123).random()
    targets = [target_of(environment.new_episode(seed, "g")) for seed in (1, 2, 1)]
    assert random.random() == expected  # textarena reseeds the global random; the adapter restores it
    assert targets[0] == targets[2]


def test_the_shipped_config_reads_and_a_tiny_model_trains_an_iteration_on_the_game(tmp_path, capsys):
    import yaml
    from cli_helpers import REPO, run_inprocess
    from tiny_chat import save_tiny_chat_model

    shipped = REPO / "configs" / "textarena_guess.yaml"
    printed = run_inprocess(capsys, "fit", "--config", str(shipped), "--print_config")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert yaml.safe_load(printed.stdout)["model"]["environment_class"]["init_args"]["env_id"] == "GuessTheNumber-v0"

    config = yaml.safe_load(shipped.read_text())
    model = config["model"]
    model["base_model"] = {"path": str(save_tiny_chat_model(tmp_path / "tiny_llama"))}
    model["policy"].update(max_new_tokens=6, lora=None)
    model["critic"]["lora"] = None
    model["loop"].update(episodes_per_iteration=4, eval_episodes=2, rollout_batch_size=4, max_prompt_tokens=128)
    config["data"].update(max_prompt_tokens=128, max_action_tokens=6, critic_batch_size=4, policy_batch_size=2)
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "tiny_guess.yaml"
    path.write_text(yaml.safe_dump(config))
    res = run_inprocess(capsys, "fit", "--config", str(path), "--run_dir", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
