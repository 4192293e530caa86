"""Pure domain rules: credential format, password hashing, narrowing, pages, settings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.auth.domain import credentials, pages
from services.auth.domain.passwords import MAX_PASSWORD_BYTES, Passwords
from services.auth.domain.permissions import (
    PERMISSIONS,
    Limits,
    expand,
    limits_within,
    min_limits,
    narrow_models,
    pattern_covered,
)
from services.auth.settings import AuthSettings, load_auth_settings
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.settings import SettingsError

PEPPER = {"TOKENYARD_AUTH_KEY_PEPPER": "0123456789abcdef-pepper"}


@pytest.mark.parametrize(
    "prefix",
    [credentials.USER_KEY_PREFIX, credentials.SERVICE_KEY_PREFIX, credentials.SESSION_PREFIX],
)
def test_generated_credentials_parse_and_carry_enough_entropy(prefix: str) -> None:
    key = credentials.generate(prefix)
    assert key.startswith(prefix)
    assert credentials.parse(key).prefix == prefix
    # 32 base62 characters: log2(62**32) ≈ 190 bits ≥ 128.
    assert credentials.SECRET_CHARS * 5.95 >= 128
    assert credentials.hint(key) == f"{prefix}…{key[-4:]}"
    assert credentials.generate(prefix) != key


def test_one_changed_character_fails_the_checksum() -> None:
    key = credentials.generate(credentials.USER_KEY_PREFIX)
    i = len(credentials.USER_KEY_PREFIX) + 3
    swapped = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1 :]
    with pytest.raises(Unauthenticated):
        credentials.parse(swapped)


@given(st.text(max_size=80))
def test_random_text_is_never_a_valid_credential(text: str) -> None:
    with pytest.raises(Unauthenticated):
        credentials.parse("ty_sk_" + text)


def test_digest_depends_on_the_pepper() -> None:
    key = credentials.generate(credentials.USER_KEY_PREFIX)
    a, b = (
        credentials.digest("pepper-one-xxxxxxxx", key),
        credentials.digest("pepper-two-xxxxxxx", key),
    )
    assert a != b and len(a) == 64 and key not in a


def test_production_argon2_defaults_meet_owasp() -> None:
    a = AuthSettings(key_pepper="x" * 16).argon2
    assert a.memory_kib >= 19 * 1024 and a.time_cost >= 2 and a.parallelism >= 1


def test_passwords_verify_rehash_and_length_cap() -> None:
    weak, strong = Passwords(1, 64, 1), Passwords(2, 128, 1)
    stored = weak.hash("correct horse")
    assert weak.verify(stored, "correct horse") and not weak.verify(stored, "wrong horse")
    assert not weak.verify(None, "anything at all")  # unknown user: dummy hash, still false
    assert strong.needs_rehash(stored) and not weak.needs_rehash(stored)
    long_ok = "a" * MAX_PASSWORD_BYTES
    stored_long = weak.hash(long_ok)
    assert not weak.verify(stored_long, long_ok[:-1] + "b")  # no truncation
    with pytest.raises(InvalidArgument, match="password"):
        weak.hash(long_ok + "a")
    with pytest.raises(InvalidArgument, match="password"):
        weak.hash("short")


def test_model_patterns_and_narrowing() -> None:
    assert pattern_covered("smol-135m", ["smol-*"])
    assert pattern_covered("smol-*", ["*"])
    assert not pattern_covered("*", ["smol-*"])
    assert not pattern_covered("big", ["smol-*"])
    assert narrow_models([], ["smol-*"]) == ["smol-*"]
    assert narrow_models(["smol-1", "big"], ["smol-*"]) == ["smol-1"]


def test_effective_limits_are_the_minimum() -> None:
    role = Limits({"requests_per_minute": 100, "token_quota": 10}, "month")
    key = Limits({"requests_per_minute": 10, "concurrent_streams": 2})
    eff = min_limits([role, key])
    assert dict(eff.values) == {
        "requests_per_minute": 10,
        "token_quota": 10,
        "concurrent_streams": 2,
    }
    assert eff.quota_period == "month"
    assert limits_within(Limits(), role) == "requests_per_minute"
    narrow = {"requests_per_minute": 5, "token_quota": 1}
    assert limits_within(Limits(narrow, "month"), role) is None
    # 1 a day is up to 31 a month: looser than 10 a month.
    assert limits_within(Limits(narrow), role) == "token_quota"
    assert expand(["admin"]) == PERMISSIONS


def test_page_tokens_are_bound_to_their_filters() -> None:
    token = pages.encode(["bob"], ["users", "x"])
    assert pages.decode(token, ["users", "x"]) == ["bob"]
    for bad in ("%%", "e30", token + "x" * 2000):
        with pytest.raises(InvalidArgument, match="page_token"):
            pages.decode(bad, ["users", "x"])
    with pytest.raises(InvalidArgument, match="filters"):
        pages.decode(token, ["users", "y"])
    with pytest.raises(InvalidArgument, match="page_size"):
        pages.page_size(1001)
    assert pages.page_size(0) == 50


def test_settings_defaults_and_errors() -> None:
    s = load_auth_settings(PEPPER)
    assert s.server.port == 50052
    assert s.database_url == "sqlite:///.tokenyard/auth.db"
    assert "0123456789abcdef" not in repr(s)
    assert load_auth_settings({**PEPPER, "TOKENYARD_AUTH_PORT": "6000"}).server.port == 6000
    with pytest.raises(SettingsError, match="TOKENYARD_AUTH_KEY_PEPPER"):
        load_auth_settings({})
    with pytest.raises(SettingsError, match="TOKENYARD_AUTH_DATABASE_URL"):
        load_auth_settings({**PEPPER, "TOKENYARD_AUTH_DATABASE_URL": "mysql://db"})
    with pytest.raises(SettingsError, match="TOKENYARD_AUTH_DATABASE_URL"):
        load_auth_settings({**PEPPER, "TOKENYARD_AUTH_DATABASE_URL": "postgresql://db"})
    with pytest.raises(SettingsError, match="TOKENYARD_AUTH_OLD_KEY_PEPPERS"):
        load_auth_settings({**PEPPER, "TOKENYARD_AUTH_OLD_KEY_PEPPERS": "nonsense"})
    old = load_auth_settings(
        {**PEPPER, "TOKENYARD_AUTH_OLD_KEY_PEPPERS": "7:old-pepper-0123456789"}
    )
    assert old.peppers()[7] == "old-pepper-0123456789"
