"""`fleet up --flower` never serves Flower without a login (unit tests of workers.commands.flower.flower_auth_env)."""

from __future__ import annotations

import stat

from workers.commands.flower import GENERATED_USER, flower_auth_env


def test_a_configured_login_is_kept_and_nothing_is_written(tmp_path):
    credentials = tmp_path / "flower-credentials"
    env, line = flower_auth_env({"FLOWER_BASIC_AUTH": "ops:s3cret"}, credentials)
    assert env == {}  # Flower inherits FLOWER_BASIC_AUTH from the environment as it is
    assert "s3cret" not in line
    assert not credentials.exists()


def test_without_a_login_one_is_generated_into_an_owner_only_file(tmp_path):
    credentials = tmp_path / "var" / "flower-credentials"
    env, line = flower_auth_env({}, credentials)
    user, _, password = env["FLOWER_BASIC_AUTH"].partition(":")
    assert user == GENERATED_USER and len(password) >= 20
    assert credentials.read_text().strip() == env["FLOWER_BASIC_AUTH"]
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert password not in line and str(credentials) in line

    again, _ = flower_auth_env({}, credentials)
    assert again["FLOWER_BASIC_AUTH"] != env["FLOWER_BASIC_AUTH"]  # a fresh password per start
