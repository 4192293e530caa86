"""`tokenyard auth serve|migrate|bootstrap`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from typing import Any

log = logging.getLogger("tokenyard.auth")


def register(subparsers: Any) -> None:
    """Add the `auth` command group."""
    from services.auth.settings import SERVICE, AuthSettings
    from services.common.settings import add_flags

    auth = subparsers.add_parser("auth", help="the auth service (users, roles, API keys)")
    sub = auth.add_subparsers(dest="auth_command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the auth gRPC service")
    add_flags(serve, AuthSettings, SERVICE)
    serve.add_argument("--migrate", action="store_true", help="apply migrations before serving")
    serve.set_defaults(handler=_serve)

    mig = sub.add_parser("migrate", help="apply database migrations")
    add_flags(mig, AuthSettings, SERVICE)
    mig.set_defaults(handler=_migrate)

    boot = sub.add_parser("bootstrap", help="create the first admin; prints an admin API key")
    add_flags(boot, AuthSettings, SERVICE)
    boot.add_argument("--username", default="admin", help="admin login name")
    boot.set_defaults(handler=_bootstrap)

    grants = sub.add_parser(
        "service-grants",
        help="print the SQL (run as the owner) that sets up the PostgreSQL service role",
    )
    grants.add_argument("--role", required=True, help="the role the auth service logs in as")
    grants.add_argument("--schema", default="public", help="the schema of the auth tables")
    grants.set_defaults(handler=_service_grants)


def _settings(args: argparse.Namespace) -> Any:
    from services.auth.settings import load_auth_settings

    return load_auth_settings(os.environ, vars(args))


def _service_grants(args: argparse.Namespace) -> int:
    from services.auth.db.service_role import service_role_sql

    try:
        statements = service_role_sql(args.role, args.schema)
    except ValueError as exc:
        print(f"tokenyard: {exc}", file=sys.stderr)
        return 2
    print("\n".join(f"{s};" for s in statements))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from services.auth import migrate
    from services.auth.db.engine import Database

    settings = _settings(args)
    db = Database(settings.database_url)
    try:
        migrate.upgrade(db.engine)
        print(f"auth database at revision {migrate.current_revision(db.engine)}")
    finally:
        db.close()
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from services.auth.bootstrap import bootstrap_admin
    from services.auth.domain.passwords import check_length
    from services.common.errors import TokenyardError

    settings = _settings(args)
    password = settings.bootstrap_password or ""
    if not password:
        if not sys.stdin.isatty():
            print(
                "tokenyard: set TOKENYARD_AUTH_BOOTSTRAP_PASSWORD or run in a terminal",
                file=sys.stderr,
            )
            return 2
        password = getpass.getpass("admin password: ")
        if password != getpass.getpass("again: "):
            print("tokenyard: the passwords differ", file=sys.stderr)
            return 2
    try:
        check_length(password)
        key = asyncio.run(bootstrap_admin(settings, args.username, password))
    except TokenyardError as exc:
        print(f"tokenyard: {exc.message}", file=sys.stderr)
        return 1
    print(f"admin {args.username!r} created. Admin API key (shown once, store it now):")
    print(key)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from services.common.errors import FailedPrecondition
    from services.common.lifecycle import observe

    settings = _settings(args)
    observe("auth", settings.observability)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        asyncio.run(_run(settings, args.migrate))
    except FailedPrecondition as exc:
        print(f"tokenyard: {exc.message}", file=sys.stderr)
        return 1
    except OperationalError as exc:
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"tokenyard: cannot use the auth database {where}: {reason}", file=sys.stderr)
        return 1
    return 0


async def _run(settings: Any, migrate_first: bool) -> None:
    from services.auth import migrate
    from services.auth.app import AuthApp
    from services.common.lifecycle import serve

    async def make() -> AuthApp:
        app = AuthApp(settings)
        if migrate_first:
            await asyncio.to_thread(migrate.upgrade, app.core.db.engine)
        log.info("auth ready", extra={"database": app.core.db.dialect})
        return app

    await serve("auth", settings.server, make)
