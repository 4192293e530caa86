"""The PostgreSQL grants of the role the auth service runs as in production.

Migrations run under the owner role; the service connects as a role that may
read and write its tables but only INSERT and SELECT audit rows, and only read
the migration version. So even a compromised auth process cannot rewrite,
delete or truncate the audit log (the triggers stop the owner as well).
"""

from __future__ import annotations

import re

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MUTABLE = (
    "users",
    "roles",
    "user_roles",
    "api_keys",
    "login_sessions",
    "usage_records",
    "usage_daily",
    "revocations",
    "audit_tallies",
)
APPEND_ONLY = ("audit_events",)
READ_ONLY = ("alembic_version",)


def service_role_sql(role: str, schema: str = "public") -> list[str]:
    """The statements (run as the owner, after migrating) that set up `role`."""
    for name, value in (("role", role), ("schema", schema)):
        if not _IDENT.fullmatch(value):
            raise ValueError(f"{name} must be a plain lower-case identifier, got {value!r}")

    def tables(names: tuple[str, ...]) -> str:
        return ", ".join(f"{schema}.{t}" for t in names)

    return [
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables(MUTABLE)} TO {role}",
        f"GRANT SELECT, INSERT ON {tables(APPEND_ONLY)} TO {role}",
        f"GRANT SELECT ON {tables(READ_ONLY)} TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
    ]
