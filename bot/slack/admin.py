"""Admins in Slack: `/supportbot status|retrain|models|promote NAME|rollback`, the App Home tab, the
Retrain / Promote / Roll back buttons, and the retrain report a worker posts back (``send_report``).

Every command and button goes through model.retrain.chat_command, which checks the role in
core/roles.py and audits it; a refusal says why. Reports go to the admin's DM with the app.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from core import texts
from core.settings import Settings

log = logging.getLogger(__name__)

PLATFORM = "slack"
COMMAND = "/supportbot"
RETRAIN_ACTION = "admin_retrain"
PROMOTE_ACTION = "admin_promote"
ROLLBACK_ACTION = "admin_rollback"
REPORT_BLOCK = "retrain-report"
SECTION_CHARS = 3000  # Slack's limit on a section's text


def is_admin_text(text: str) -> bool:
    from model.retrain import COMMANDS

    words = (text or "").split()
    return bool(words) and words[0].lower() in COMMANDS


def register(app, *, settings: Settings, db) -> None:  # type: ignore[no-untyped-def]
    """Add the admin listeners. Called before the app's own /supportbot listener, which keeps the rest."""
    from model.retrain import chat_command, status
    from workers.retrain_tasks import enqueue_retrain

    def act(user: str, text: str):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            with db.session() as session:
                outcome = chat_command(session=session, settings=settings, actor=f"{PLATFORM}:{user}", text=text)
            if outcome.retrain:
                enqueue_retrain(requested_by=f"{PLATFORM}:{user}", targets=[{"platform": PLATFORM, "user": user}])
            return outcome

        return asyncio.to_thread(run)

    def home_for(user: str) -> dict[str, Any]:
        from core.roles import role_of
        from core.schema import Role

        with db.session() as session:
            role = role_of(session=session, platform=PLATFORM, external_id=user, settings=settings)
            return home_view(status(session=session) if role == Role.admin else None)

    async def publish_home(client, user: str) -> None:  # type: ignore[no-untyped-def]
        view = await asyncio.to_thread(home_for, user)
        await client.views_publish(user_id=user, view=view)

    async def admin_words(body) -> bool:  # type: ignore[no-untyped-def]
        return is_admin_text(body.get("text") or "")

    @app.command(COMMAND, matchers=[admin_words])
    async def on_admin_command(ack, command) -> None:  # type: ignore[no-untyped-def]
        # Slack wants the acknowledgement within 3 s: a retrain is queued, never run, here.
        outcome = await act(command["user_id"], command.get("text") or "")
        await ack(text=outcome.text)

    @app.event("app_home_opened")
    async def on_home(event, client) -> None:  # type: ignore[no-untyped-def]
        if event.get("tab", "home") == "home":
            await publish_home(client, event["user"])

    async def on_button(ack, body, client, text: str) -> None:  # type: ignore[no-untyped-def]
        await ack()
        user = body["user"]["id"]
        outcome = await act(user, text)
        # From a report in the DM: answer there. From the Home tab: the DM too (a tab has no thread).
        channel = (body.get("container") or {}).get("channel_id") or (body.get("channel") or {}).get("id") or user
        await client.chat_postMessage(channel=channel, text=outcome.text)
        if body.get("view", {}).get("type") == "home" or (body.get("container") or {}).get("type") == "view":
            await publish_home(client, user)

    @app.action(RETRAIN_ACTION)
    async def on_retrain(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await on_button(ack, body, client, "retrain")

    @app.action(PROMOTE_ACTION)
    async def on_promote(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await on_button(ack, body, client, f"promote {body['actions'][0].get('value', '')}")

    @app.action(ROLLBACK_ACTION)
    async def on_rollback(ack, body, client) -> None:  # type: ignore[no-untyped-def]
        await on_button(ack, body, client, "rollback")


# Layout -------------------------------------------------------------------------------------------


def _button(action_id: str, label: str, value: str = "-", style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {"type": "button", "action_id": action_id, "value": value,
                              "text": {"type": "plain_text", "text": label}}  # fmt: skip
    if style:
        button["style"] = style
    return button


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:SECTION_CHARS]}}


def _code(text: str) -> str:
    return "```" + text.replace("```", "'''")[: SECTION_CHARS - 6] + "```"


def home_view(info: dict[str, Any] | None) -> dict[str, Any]:
    """The App Home tab: for admins the models and the buttons; for everyone else what the bot does."""
    from model.retrain import status_text, table_text

    if info is None:
        return {"type": "home", "blocks": [_section(texts.CHAT_HELP)]}
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": "supportbot models"}},
              _section(status_text(info))]  # fmt: skip
    evaluation = info.get("candidate_evaluation")
    if evaluation and evaluation.get("table"):
        blocks.append(_section(_code(table_text(evaluation))))
    buttons = [_button(RETRAIN_ACTION, texts.BUTTON_RETRAIN)]
    if info.get("promotable"):
        buttons.append(_button(PROMOTE_ACTION, texts.BUTTON_PROMOTE, info["candidate"]["name"], "primary"))
    if info.get("active"):
        buttons.append(_button(ROLLBACK_ACTION, texts.BUTTON_ROLLBACK, info["active"]["name"], "danger"))
    blocks.append({"type": "actions", "block_id": "admin-actions", "elements": buttons})
    return {"type": "home", "blocks": blocks}


def report_blocks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report: verdict in words, the metrics table, and Promote only when the gate passed."""
    from model.retrain import report_text, table_text

    blocks = [_section(report_text(report))]
    if report.get("table"):
        blocks.append(_section(_code(table_text(report))))
    if report.get("status") == "evaluated" and report["gate"]["passed"]:
        blocks.append({"type": "actions", "block_id": REPORT_BLOCK,
                       "elements": [_button(PROMOTE_ACTION, texts.BUTTON_PROMOTE, report["version"], "primary")]})
    return blocks


# The worker's side ------------------------------------------------------------------------------------


def send_report(client, *, user: str, report: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """Post the report in the admin's DM, then the loss curve as an image (files upload v2)."""
    from model.retrain import report_text

    channel = client.conversations_open(users=user)["channel"]["id"]
    client.chat_postMessage(channel=channel, text=report_text(report), blocks=report_blocks(report))
    image = Path(report.get("loss_image") or "")
    if image.is_file():
        client.files_upload_v2(channel=channel, file=str(image), filename="loss.png",
                               title=texts.ADMIN_LOSS_TITLE.format(name=report["version"]))  # fmt: skip
