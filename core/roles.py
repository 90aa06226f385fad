"""Who may do what: the one place roles are decided and privileged actions are checked and audited.

A person is named by a platform-qualified id ("slack:U123", "telegram:42", "web:alice", "cli:root").
Their role is the highest of what the sources say:
- the settings ``admins`` / ``technicians`` (SUPPORTBOT_ADMINS / SUPPORTBOT_TECHNICIANS, JSON lists);
- the stored ``users.role`` of that platform user (set by the chat adapters, e.g. desk membership);
- for ``web:NAME``, the role of that web console account;
- ``cli:NAME`` is whoever runs `supportbot` on the host: they can read the database and the settings
  anyway, so they count as an admin, and what they do is audited like everyone else's.

``authorize`` is called before every privileged action. It writes one audit row whatever the answer,
in its own transaction, so that a refusal is on record even though the caller's work is rolled back.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import SupportbotError
from core.schema import AuditEntry, Role, User, WebAccount

if TYPE_CHECKING:
    from core.settings import Settings

RANK = {Role.employee: 0, Role.technician: 1, Role.admin: 2}

# The least role each privileged action needs. An action not listed here is a programming error.
ACTIONS: dict[str, Role] = {
    "rate.on_behalf": Role.admin,  # rate an answer as another user
    "train": Role.admin,
    "retrain": Role.admin,
    "models.promote": Role.admin,
    "models.rollback": Role.admin,
    "models.view": Role.admin,  # the model registry and training status in chat
    "console.view": Role.admin,  # the web console's quality, conversation, training and model pages
    "escalations.view": Role.technician,
    "escalations.claim": Role.technician,  # the desk's Claim button / `supportbot escalations claim`
    "escalations.resolve": Role.technician,  # the desk's Resolve button, modal and /resolve
    "tickets.search": Role.technician,
    "tickets.release": Role.admin,
    "tickets.delete": Role.admin,
    "accounts.create": Role.admin,
}

ALLOWED = "allowed"
DENIED = "denied"
SUCCEEDED = "succeeded"
FAILED = "failed"
MAX_DETAIL_CHARS = 2000


class PermissionDenied(SupportbotError):
    """A person tried an action their role does not allow. The message says who, what and why."""

    def __init__(self, message: str, *, actor: str, action: str, role: Role) -> None:
        super().__init__(message)
        self.actor = actor
        self.action = action
        self.role = role


@dataclass(frozen=True)
class Actor:
    """Someone acting: a platform and that platform's id for them."""

    platform: str
    external_id: str

    @property
    def qualified(self) -> str:
        return f"{self.platform}:{self.external_id}"

    @classmethod
    def parse(cls, value: str | Actor) -> Actor:
        if isinstance(value, Actor):
            return value
        platform, _, external_id = str(value).partition(":")
        if not platform or not external_id:
            raise SupportbotError(f"{value!r} is not a platform-qualified id like 'slack:U123'")
        return cls(platform=platform, external_id=external_id)

    def __str__(self) -> str:
        return self.qualified


def cli_actor() -> Actor:
    """The operator running `supportbot` on this host."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        name = "unknown"
    return Actor(platform="cli", external_id=name)


def chat_help(*, session: Session, platform: str, external_id: str, settings: Settings) -> str:
    """The chat help; an admin also reads the admin commands (others would only be refused them)."""
    from core import texts

    admin = role_of(session=session, platform=platform, external_id=external_id, settings=settings) == Role.admin
    return texts.CHAT_HELP + ("\n\n" + texts.ADMIN_HELP if admin else "")


def role_of(*, session: Session, platform: str, external_id: str, settings: Settings) -> Role:
    """The highest role any source gives this person; employee when none says more."""
    qualified = f"{platform}:{external_id}"
    roles = [Role.employee]
    if qualified in settings.admins:
        roles.append(Role.admin)
    if qualified in settings.technicians:
        roles.append(Role.technician)
    if platform == "cli":
        roles.append(Role.admin)
    elif platform == "web":
        account = session.scalars(select(WebAccount).where(WebAccount.name == external_id)).first()
        if account is not None:
            roles.append(account.role)
    else:
        stored = session.scalars(
            select(User.role).where(User.platform == platform, User.external_id == external_id)
        ).first()
        if stored is not None:
            roles.append(Role(stored))
    return max(roles, key=RANK.__getitem__)


def allows(role: Role, action: str) -> bool:
    if action not in ACTIONS:
        raise SupportbotError(f"unknown privileged action {action!r}")
    return RANK[role] >= RANK[ACTIONS[action]]


def authorize(
    *, session: Session, actor: Actor | str, action: str, settings: Settings, detail: str = ""
) -> Role:
    """Allow the action or raise PermissionDenied saying why; either way one audit row is written.

    Call it before the action writes anything: on SQLite the audit row's own transaction waits for any
    write lock the caller's session holds.
    """
    who = Actor.parse(actor)
    role = role_of(session=session, platform=who.platform, external_id=who.external_id, settings=settings)
    allowed = allows(role, action)
    record(session=session, actor=who, role=role, action=action, result=ALLOWED if allowed else DENIED,
           detail=detail)  # fmt: skip
    if not allowed:
        needed = ACTIONS[action]
        raise PermissionDenied(
            f"{who.qualified} may not {action}: it needs the {needed.value} role and they are "
            f"{'an' if role == Role.employee or role == Role.admin else 'a'} {role.value} "
            f"(admins are listed in SUPPORTBOT_ADMINS, technicians in SUPPORTBOT_TECHNICIANS)",
            actor=who.qualified,
            action=action,
            role=role,
        )
    return role


def record(
    *, session: Session, actor: Actor | str, role: Role | str, action: str, result: str, detail: str = ""
) -> None:
    """Write one audit row in its own transaction (it survives a rollback of the caller's session)."""
    entry = AuditEntry(
        actor=Actor.parse(actor).qualified,
        role=Role(role).value,
        action=action,
        result=result,
        detail=(detail or "")[:MAX_DETAIL_CHARS],
    )
    with Session(bind=session.get_bind()) as own:
        own.add(entry)
        own.commit()


def audit_trail(*, session: Session, limit: int = 100, actor: str | None = None) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    return list(session.scalars(query))
