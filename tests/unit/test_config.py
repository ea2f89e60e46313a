"""The user config file: defaults and credential references (variable names, never values)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.config import autodl_token_env, load_user_config, runs_folder
from runner.errors import BadInput
from runner.spec import AutodlProvider

pytestmark = pytest.mark.unit


def user_config(text: str) -> None:
    Path(os.environ["RUNNER_CONFIG"]).write_text(text, encoding="utf-8")


def test_without_a_file_everything_has_its_built_in_default():
    assert runs_folder(None) == Path("runs")
    assert autodl_token_env(AutodlProvider(type="autodl", instance="abc")) == "AUTODL_TOKEN"


def test_the_runs_folder_is_given_then_configured_then_runs():
    user_config('[defaults]\nout = "~/all-runs"\n')
    assert runs_folder(None) == Path("~/all-runs").expanduser()
    assert runs_folder(Path("here")) == Path("here")


def test_the_token_variable_a_spec_names_wins_over_the_configured_one():
    user_config('[credentials]\nautodl_token_env = "AUTODL_TOKEN_WORK"\n')
    assert autodl_token_env(AutodlProvider(type="autodl", instance="abc")) == "AUTODL_TOKEN_WORK"
    named = AutodlProvider(type="autodl", instance="abc", token_env="MINE")
    assert autodl_token_env(named) == "MINE"


def test_a_credential_value_has_no_place_in_the_file():
    user_config('[credentials]\nautodl_token = "tok-123"\n')
    with pytest.raises(BadInput, match=r"credentials.autodl_token: Extra inputs are not permitted"):
        load_user_config()
    user_config('[credentials]\nautodl_token_env = "not a name"\n')
    with pytest.raises(BadInput, match=r"credentials.autodl_token_env: "):
        load_user_config()
