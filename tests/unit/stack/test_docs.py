"""The configuration reference is the code's: regenerated, it must not change."""

from __future__ import annotations

import re

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


def test_every_variable_named_in_code_or_deployment_files_is_documented() -> None:
    """A variable read (or set for a service) anywhere appears in docs/configuration.md."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    files = [
        *(ROOT / "services").rglob("*.py"),
        *(ROOT / "deploy").rglob("*.yaml"),
        *ROOT.glob("docker-compose*.yml"),
        ROOT / ".env",
        ROOT / "Dockerfile",
    ]
    named: set[str] = set()
    for path in files:
        # Complete names only: templates (`TOKENYARD_{service}_PORT`) and prefixes
        # (`TOKENYARD_ROUTER_`) are the settings classes', which render the doc.
        named |= set(re.findall(r"\b(TOKENYARD_[A-Z0-9_]*[A-Z0-9])\b(?![{_])", path.read_text()))
    missing = sorted(n for n in named if f"`{n}`" not in doc)
    assert not missing, missing
