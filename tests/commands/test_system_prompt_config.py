"""model.system_prompt is checked with the other settings, before any work: it needs a chat base_model."""

from __future__ import annotations

import pytest
from cli_helpers import REPO, SMOKE, run_cli

from iterppo_lightning.commands.lightning_cli import FitConfigError, resolve_fit_config

SMOKE_CHAT = REPO / "configs" / "smoke_chat.yaml"


def test_a_system_prompt_without_a_chat_base_model_is_refused_by_its_key():
    with pytest.raises(FitConfigError) as refused:
        resolve_fit_config([str(SMOKE)], ["--model.system_prompt", "We sell laptops."])
    assert "model.system_prompt needs model.base_model" in str(refused.value)


def test_an_empty_system_prompt_is_refused():
    with pytest.raises(FitConfigError) as refused:
        resolve_fit_config([str(SMOKE_CHAT)], ["--model.system_prompt", " "])
    assert "model.system_prompt must be non-empty text" in str(refused.value)


def test_a_system_prompt_with_a_chat_base_model_passes():
    resolve_fit_config([str(SMOKE_CHAT)], ["--model.system_prompt", "We sell laptops."])


def test_fit_refuses_it_before_a_run_folder_exists(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(SMOKE), "--run_dir", str(run_dir), "--model.system_prompt", "shop")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.system_prompt" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
