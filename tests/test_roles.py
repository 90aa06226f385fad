"""Roles decided in one place (core/roles.py), refusals that say why, and an audit row for every attempt."""

from __future__ import annotations

import getpass

import pytest
from sqlalchemy import select

from core.conversations import get_or_create_user
from core.db import Database
from core.roles import PermissionDenied, audit_trail, authorize, role_of
from core.schema import AuditEntry, ModelStatus, ModelVersion, Rating, Role
from core.settings import load_settings


def test_role_comes_from_settings_stored_users_web_accounts_and_the_host(settings, db: Database) -> None:
    from bot.web.auth import create_account

    settings = settings.model_copy(update={"admins": ["slack:UADMIN"], "technicians": ["telegram:42"]})
    with db.session() as s:
        get_or_create_user(session=s, platform="slack", external_id="UTECH", role=Role.technician)
        get_or_create_user(session=s, platform="telegram", external_id="42")  # stored employee, listed technician
        create_account(session=s, name="lead", password="a long enough password")
        create_account(session=s, name="desk", password="a long enough password", role=Role.technician)
    with db.session() as s:
        def role(platform: str, external_id: str) -> Role:
            return role_of(session=s, platform=platform, external_id=external_id, settings=settings)

        assert role("slack", "UADMIN") == Role.admin
        assert role("slack", "UTECH") == Role.technician
        assert role("telegram", "42") == Role.technician  # the highest source wins
        assert role("slack", "USOMEONE") == Role.employee  # unknown: the least role
        assert role("web", "lead") == Role.admin
        assert role("web", "desk") == Role.technician
        assert role("web", "nobody") == Role.employee
        assert role("cli", "root") == Role.admin  # the operator on the host


def test_ids_come_from_the_environment_as_json(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SUPPORTBOT_ADMINS", '["slack:U123", "telegram:42"]')
    monkeypatch.setenv("SUPPORTBOT_TECHNICIANS", '["slack:U7"]')
    settings = load_settings(data_dir=tmp_path)
    assert settings.admins == ["slack:U123", "telegram:42"] and settings.technicians == ["slack:U7"]
    monkeypatch.setenv("SUPPORTBOT_ADMINS", '["U123"]')
    with pytest.raises(ValueError, match="platform-qualified"):
        load_settings(data_dir=tmp_path)


def test_employee_is_refused_with_a_reason_and_the_refusal_is_audited(settings, db: Database) -> None:
    with pytest.raises(PermissionDenied) as refused, db.session() as s:
        authorize(session=s, actor="slack:U9", action="retrain", settings=settings, detail="from /supportbot")
    message = str(refused.value)
    assert "slack:U9 may not retrain" in message and "admin role" in message and "employee" in message
    # The caller's session rolled back, but the audit row was written in its own transaction.
    with db.session() as s:
        (entry,) = audit_trail(session=s)
        assert (entry.actor, entry.role, entry.action, entry.result, entry.detail) == (
            "slack:U9", "employee", "retrain", "denied", "from /supportbot",
        )  # fmt: skip
        assert entry.at is not None


def test_admin_is_allowed_and_audited(settings, db: Database) -> None:
    settings = settings.model_copy(update={"admins": ["telegram:42"]})
    with db.session() as s:
        assert authorize(session=s, actor="telegram:42", action="models.promote", settings=settings) == Role.admin
    with db.session() as s:
        assert [(e.actor, e.result) for e in audit_trail(session=s)] == [("telegram:42", "allowed")]


def test_a_technician_may_search_tickets_but_not_release_them(settings, db: Database) -> None:
    settings = settings.model_copy(update={"technicians": ["slack:UT"]})
    with db.session() as s:
        authorize(session=s, actor="slack:UT", action="tickets.search", settings=settings)
        with pytest.raises(PermissionDenied, match="needs the admin role"):
            authorize(session=s, actor="slack:UT", action="tickets.release", settings=settings)


def test_an_unknown_action_is_a_programming_error(settings, db: Database) -> None:
    from core.errors import SupportbotError

    with db.session() as s, pytest.raises(SupportbotError, match="unknown privileged action"):
        authorize(session=s, actor="cli:root", action="launch.rockets", settings=settings)


# The CLI: the operator on the host is the local admin; what they do on someone's behalf is audited.


def _answer(db: Database) -> int:
    from core.conversations import get_or_create_conversation, store_reply
    from core.schema import Message, MessageRole

    with db.session() as s:
        user = get_or_create_user(session=s, platform="slack", external_id="U1")
        conv = get_or_create_conversation(session=s, platform="slack", channel="C", thread="t", user_id=user.id)
        q = Message(conversation_id=conv.id, role=MessageRole.user, text="printer jams", idempotency_key="k1")
        s.add(q)
        s.flush()
        reply, _ = store_reply(session=s, question=q, text="Open tray 2.", model_version="m", sources=["T-1"])
        return reply.id


def test_cli_rate_is_one_vote_per_person_and_rating_for_someone_else_is_audited(
    settings, db: Database, monkeypatch, capsys
) -> None:
    from bot.cli import main

    answer = _answer(db)
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(settings.data_dir))
    assert main(["rate", str(answer), "good"]) == 0
    assert main(["rate", str(answer), "bad"]) == 0  # the operator changes their own vote
    with db.session() as s:
        other = get_or_create_user(session=s, platform="slack", external_id="U2").id
    assert main(["rate", str(answer), "good", "--user-id", str(other)]) == 0
    operator = f"cli:{getpass.getuser()}"
    with db.session() as s:
        votes = {(r.user_id, r.value) for r in s.scalars(select(Rating).where(Rating.message_id == answer))}
        mine = get_or_create_user(session=s, platform="cli", external_id=getpass.getuser()).id
        assert votes == {(mine, -1), (other, 1)}
        entries = [(e.actor, e.action, e.result) for e in audit_trail(session=s)]
    assert entries == [(operator, "rate.on_behalf", "allowed")]


def test_cli_rollback_and_promote_are_audited(settings, db: Database, monkeypatch, tmp_path) -> None:
    from bot.cli import main
    from model import registry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with db.session() as s:
        registry.register_candidate(session=s, name="v1", base_model="b", adapter_path=adapter, dataset_hash=None,
                                    config={}, metrics={})  # fmt: skip
        registry.record_gate(session=s, name="v1", passed=True, report={})
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(settings.data_dir))
    assert main(["models", "rollback"]) == 0
    assert main(["models", "promote", "nope"]) == 2  # audited as allowed, then the registry says there is none
    with db.session() as s:
        assert s.scalars(select(ModelVersion.status)).one() == ModelStatus.retired
        rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(r.action, r.result, r.role) for r in rows] == [
        ("models.rollback", "allowed", "admin"),
        ("models.promote", "allowed", "admin"),
    ]


def test_desk_claim_and_resolve_are_their_own_actions_for_technicians_and_admins(settings, db: Database) -> None:
    settings = settings.model_copy(update={"technicians": ["slack:UT"], "admins": ["telegram:7"]})
    with db.session() as s:
        for action in ("escalations.claim", "escalations.resolve"):
            assert authorize(session=s, actor="slack:UT", action=action, settings=settings) == Role.technician
            assert authorize(session=s, actor="telegram:7", action=action, settings=settings) == Role.admin
    for action, verb in (("escalations.claim", "claim"), ("escalations.resolve", "resolve")):
        with pytest.raises(PermissionDenied) as refused, db.session() as s:
            authorize(session=s, actor="slack:UE", action=action, settings=settings, detail=f"{verb} escalation #3")
        assert f"slack:UE may not escalations.{verb}" in str(refused.value)
        assert "technician role" in str(refused.value) and "employee" in str(refused.value)
    with db.session() as s:
        rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(r.actor, r.action, r.result) for r in rows] == [
        ("slack:UT", "escalations.claim", "allowed"),
        ("telegram:7", "escalations.claim", "allowed"),
        ("slack:UT", "escalations.resolve", "allowed"),
        ("telegram:7", "escalations.resolve", "allowed"),
        ("slack:UE", "escalations.claim", "denied"),
        ("slack:UE", "escalations.resolve", "denied"),
    ]
    assert rows[-1].detail == "resolve escalation #3"


def test_chat_help_lists_the_admin_commands_to_admins_only(settings, db: Database) -> None:
    from core import texts
    from core.roles import chat_help

    settings = settings.model_copy(update={"admins": ["slack:UADMIN"]})
    with db.session() as s:
        admin = chat_help(session=s, platform="slack", external_id="UADMIN", settings=settings)
        employee = chat_help(session=s, platform="slack", external_id="UEMPLOYEE", settings=settings)
    assert admin.startswith(texts.CHAT_HELP) and texts.ADMIN_HELP in admin
    assert employee == texts.CHAT_HELP
