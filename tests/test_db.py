"""Alembic migrations up and down on SQLite and PostgreSQL, and the schema they build matches the ORM."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from core.db import Database, downgrade, upgrade
from core.schema import Base, Message, MessageRole, MessageStatus

TABLES = {t.name for t in Base.metadata.sorted_tables}


def _check_round_trip(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    db = Database(url)
    from core.conversations import get_or_create_conversation, get_or_create_user, store_reply

    with db.session() as session:
        user = get_or_create_user(session=session, platform="console", external_id="u1")
        conv = get_or_create_conversation(session=session, platform="console", channel="c", thread="t", user_id=user.id)
        q = Message(conversation_id=conv.id, role=MessageRole.user, text="hi", idempotency_key="console:e1")
        session.add(q)
        session.flush()
        reply, created = store_reply(session=session, question=q, text="hello", model_version="m", sources=["T-1"])
        again, created_again = store_reply(session=session, question=q, text="other", model_version="m")
        assert created and not created_again and again.id == reply.id
        assert q.status == MessageStatus.answered
    db.engine.dispose()
    downgrade(url, "base")
    assert not (TABLES & set(inspect(engine).get_table_names()))
    upgrade(url)  # and back up again
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_migrations_sqlite(tmp_path):
    _check_round_trip(f"sqlite:///{tmp_path / 'x.db'}")


@pytest.mark.postgres
def test_migrations_postgres(postgres_url):
    _check_round_trip(postgres_url)
    downgrade(postgres_url, "base")


def test_migrations_match_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'y.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models changed without a migration: {diff}"
