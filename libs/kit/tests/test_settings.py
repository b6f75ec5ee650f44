"""Shared settings: case-insensitive log level, principal lifetime, delegation keys, sampling."""

from __future__ import annotations

import pytest
from pydantic_settings import SettingsConfigDict

from foredeck_kit.settings import ServiceSettings, SettingsError, load_settings


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FOREDECK_KITTEST_")


@pytest.mark.parametrize(
    ("raw", "level"),
    [("INFO", "info"), ("Debug", "debug"), (" warning ", "warning"), ("CRITICAL", "critical")],
)
def test_log_level_is_case_insensitive(
    monkeypatch: pytest.MonkeyPatch, raw: str, level: str
) -> None:
    monkeypatch.setenv("FOREDECK_KITTEST_LOG_LEVEL", raw)
    assert load_settings(_Settings).log_level == level


def test_unknown_log_level_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOREDECK_KITTEST_LOG_LEVEL", "LOUD")
    with pytest.raises(SettingsError, match="FOREDECK_KITTEST_LOG_LEVEL"):
        load_settings(_Settings)


def test_defaults() -> None:
    settings = _Settings()
    assert settings.principal_max_lifetime_seconds == 900
    assert settings.trace_sample_ratio == 0.1
    assert settings.delegation_keys.get_secret_value() == ""


def test_new_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOREDECK_KITTEST_TRACE_SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("FOREDECK_KITTEST_PRINCIPAL_MAX_LIFETIME_SECONDS", "600")
    monkeypatch.setenv("FOREDECK_KITTEST_DELEGATION_KEYS", "orch:" + "s" * 32)
    settings = load_settings(_Settings)
    assert settings.trace_sample_ratio == 0.25
    assert settings.principal_max_lifetime_seconds == 600
    assert "s" * 32 not in repr(settings)
    monkeypatch.setenv("FOREDECK_KITTEST_TRACE_SAMPLE_RATIO", "1.5")
    monkeypatch.setenv("FOREDECK_KITTEST_PRINCIPAL_MAX_LIFETIME_SECONDS", "0")
    with pytest.raises(SettingsError) as caught:
        load_settings(_Settings)
    assert "FOREDECK_KITTEST_TRACE_SAMPLE_RATIO" in str(caught.value)
    assert "FOREDECK_KITTEST_PRINCIPAL_MAX_LIFETIME_SECONDS" in str(caught.value)


def test_malformed_delegation_keys_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOREDECK_KITTEST_PRINCIPAL_KEYS", "gw:" + "g" * 32)
    monkeypatch.setenv("FOREDECK_KITTEST_DELEGATION_KEYS", "orch:short-secret")
    settings = load_settings(_Settings)
    with pytest.raises(SettingsError, match="FOREDECK_KITTEST_DELEGATION_KEYS") as caught:
        settings.principal_verifier()
    assert "short-secret" not in str(caught.value)
