"""Web console accounts, signed session cookies and CSRF tokens.

Passwords are stored as argon2id hashes (argon2-cffi). A session is a cookie signed with
``web_secret_key`` (itsdangerous) holding the account name and that session's CSRF token; every POST
must echo the token in a form field. A fresh token is issued at login, so a token seen before login is
worth nothing after it. The account is looked up on every request: deleting it or lowering its role
takes effect at once.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import ConfigError, InputError
from core.schema import Role, WebAccount, utcnow
from core.settings import Settings

log = logging.getLogger("supportbot.web")

COOKIE = "supportbot_session"
SESSION_MAX_AGE_S = 12 * 3600
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # argon2 hashes any length; this bounds the work a login form can cause
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-@")

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the account does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def secret_key(settings: Settings) -> str:
    """The session signing key; a missing one is refused outside development."""
    if settings.web_secret_key is not None:
        return settings.web_secret_key.get_secret_value()
    if settings.environment != "development":
        raise ConfigError(
            "SUPPORTBOT_WEB_SECRET_KEY is not set; the web console needs 32+ random characters to sign "
            "sessions (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    log.warning("SUPPORTBOT_WEB_SECRET_KEY is not set: using a random key; sessions end when the console stops")
    return secrets.token_urlsafe(48)


def check_new_password(password: str) -> str:
    password = password.rstrip("\r\n")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InputError(f"the password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise InputError(f"the password is longer than {MAX_PASSWORD_CHARS} characters")
    return password


def check_name(name: str) -> str:
    name = name.strip().lower()
    if not name or len(name) > 100 or not set(name) <= NAME_CHARS:
        raise InputError("an account name is 1-100 characters of a-z, 0-9, '.', '_', '-', '@'")
    return name


def create_account(*, session: Session, name: str, password: str, role: Role = Role.admin) -> WebAccount:
    """A new account, or a new password (and role) for an existing one."""
    name = check_name(name)
    hashed = _hasher.hash(check_new_password(password))
    account = session.scalars(select(WebAccount).where(WebAccount.name == name)).first()
    if account is None:
        account = WebAccount(name=name, password_hash=hashed, role=role)
        session.add(account)
    else:
        account.password_hash, account.role = hashed, role
    session.flush()
    return account


def verify_login(*, session: Session, name: str, password: str) -> WebAccount | None:
    """The account when the password is right; None otherwise (the same time either way)."""
    account = session.scalars(select(WebAccount).where(WebAccount.name == name.strip().lower())).first()
    if len(password) > MAX_PASSWORD_CHARS:
        return None
    try:
        _hasher.verify(account.password_hash if account else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if account is None:
        return None
    if _hasher.check_needs_rehash(account.password_hash):
        account.password_hash = _hasher.hash(password)
    account.last_login_at = utcnow()
    return account


@dataclass(frozen=True)
class WebSession:
    """What the signed cookie holds: the CSRF token always, the account once logged in."""

    csrf: str
    account: str | None = None

    @classmethod
    def anonymous(cls) -> WebSession:
        return cls(csrf=secrets.token_urlsafe(32))

    @classmethod
    def for_account(cls, name: str) -> WebSession:
        return cls(csrf=secrets.token_urlsafe(32), account=name)


class SessionSigner:
    def __init__(self, key: str) -> None:
        self._serializer = URLSafeTimedSerializer(key, salt="supportbot-web-session")

    def dumps(self, web_session: WebSession) -> str:
        return self._serializer.dumps({"csrf": web_session.csrf, "account": web_session.account})

    def loads(self, cookie: str | None) -> WebSession | None:
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # also covers an expired signature
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        account = data.get("account")
        return WebSession(csrf=data["csrf"], account=account if isinstance(account, str) else None)


def csrf_ok(web_session: WebSession | None, token: str | None) -> bool:
    if web_session is None or not token:
        return False
    return hmac.compare_digest(web_session.csrf.encode(), token.encode())
