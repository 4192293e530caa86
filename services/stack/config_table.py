"""docs/configuration.md, generated from the settings classes (never edited by hand).

`python -m services.stack.config_table > docs/configuration.md` rewrites it; a
unit test fails when the file and the code disagree.
"""

from __future__ import annotations

from typing import Any

from services.common.config import InternalSettings, ObservabilitySettings
from services.common.settings import known_variables

HEADER = """# Configuration

Every setting is an environment variable; where a command has a flag for it
(`--port`, `--model`…, see `tokenyard <command> --help`) the flag wins. Services
read them once at start; a bad value stops the service with one line naming the
variable. Secrets show `(secret)` and never appear in logs.

This file is generated from the settings classes by
`python -m services.stack.config_table`; a test keeps it in step with the code.
"""


def _sections() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    from services.auth import settings as auth
    from services.auth.admin_cli import AdminClientSettings
    from services.inference.settings import InferenceSettings
    from services.router.settings import RouterSettings
    from services.stack.settings import ClientSettings, StackSettings

    shared = known_variables(ObservabilitySettings) + known_variables(InternalSettings)
    shared_names = {name for name, _, _ in shared}

    def own(cls: type[Any], service: str) -> list[tuple[str, str, str]]:
        return [r for r in known_variables(cls, service) if r[0] not in shared_names]

    return [
        ("Every service", "Logging, telemetry and internal credentials.", shared),
        ("auth", "`tokenyard auth serve|migrate|bootstrap`.", own(auth.AuthSettings, "auth")),
        ("router", "`tokenyard router serve`.", own(RouterSettings, "router")),
        ("inference", "`tokenyard inference serve`.", own(InferenceSettings, "inference")),
        ("tokenyard up", "The local stack (`make up`).", own(StackSettings, "")),
        ("tokenyard generate / chat", "The terminal client.", own(ClientSettings, "")),
        (
            "tokenyard users / roles / keys / usage / audit",
            "The admin commands (they talk to auth).",
            own(AdminClientSettings, ""),
        ),
    ]


def render() -> str:
    """The whole Markdown document."""
    out = [HEADER]
    for title, blurb, rows in _sections():
        out += [f"## {title}", "", blurb, "", "| variable | default | meaning |", "|---|---|---|"]
        for name, default, help_text in rows:
            shown = f"`{default}`" if default and not default.startswith("(") else default
            escaped = help_text.replace("|", "\\|")
            out.append(f"| `{name}` | {shown} | {escaped} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
