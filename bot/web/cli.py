"""`supportbot web` (serve the console with uvicorn) and `supportbot web create-admin NAME --password-stdin`."""

from __future__ import annotations

import argparse
import sys

from core.commands import Groups, add
from core.errors import InputError
from core.settings import Settings


def register(groups: Groups) -> None:
    p = add(groups, "root", "web", serve_command, "serve the web console (quality, conversations, models)")
    p.add_argument("--port", type=int, default=None, help="port (default SUPPORTBOT_WEB_PORT, 8080)")
    p.add_argument("--host", default=None, help="address to bind (default SUPPORTBOT_WEB_HOST, 127.0.0.1)")
    sub = p.add_subparsers(dest="web_command", metavar="ACTION")
    c = sub.add_parser("create-admin", help="create a console admin (or set a new password)",
                       description="create a console admin (or set a new password)")  # fmt: skip
    c.add_argument("name", help="login name (a-z, 0-9, . _ - @)")
    c.add_argument("--password-stdin", action="store_true", help="read the password from stdin (required)")
    c.add_argument("--role", choices=["admin", "technician"], default="admin", help="console role (default admin)")
    c.set_defaults(func=create_admin_command)


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from bot.web.app import create_app
    from bot.web.auth import secret_key

    secret_key(settings)  # a missing key outside development is refused before anything starts
    port = args.port or settings.web_port
    host = args.host or settings.web_host
    app = create_app(settings=settings, database=_database(settings))
    print(f"supportbot web console on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=True)
    return 0


def create_admin_command(args: argparse.Namespace, settings: Settings) -> int:
    from bot.web.auth import create_account
    from core.roles import authorize, cli_actor
    from core.schema import Role

    if not args.password_stdin:
        raise InputError("give the password on stdin with --password-stdin (never as an argument: shell history)")
    password = sys.stdin.readline()
    database = _database(settings)
    with database.session() as session:
        authorize(session=session, actor=cli_actor(), action="accounts.create", settings=settings,
                  detail=f"web:{args.name} as {args.role}")  # fmt: skip
    with database.session() as session:
        account = create_account(session=session, name=args.name, password=password, role=Role(args.role))
        name = account.name
    print(f"web console account {name} ({args.role}) is ready; log in at /login")
    return 0


def _database(settings: Settings):  # type: ignore[no-untyped-def]
    from core.db import Database, upgrade

    settings.ensure_dirs()
    upgrade(settings.db_url)  # idempotent: the console and create-admin work on a fresh data dir
    return Database.from_settings(settings)
