"""The configuration reference is the code's: regenerated, it must not change."""

from __future__ import annotations

from services.auth.settings import AuthSettings
from services.common.settings import known_variables
from services.stack.config_table import render
from tests.unit.stack.compose_file import ROOT


def test_configuration_doc_matches_the_settings_classes() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render(), (
        "docs/configuration.md is stale: python -m services.stack.config_table "
        "> docs/configuration.md"
    )


def test_every_auth_variable_is_documented_and_secrets_show_no_default() -> None:
    doc = render()
    for name, _, _ in known_variables(AuthSettings, "auth"):
        assert f"| `{name}` |" in doc
    assert "| `TOKENYARD_AUTH_KEY_PEPPER` | (secret) |" in doc
    assert "| `TOKENYARD_API_KEY` | (secret) |" in doc
