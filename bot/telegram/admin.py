"""Admins in Telegram, in a private chat with the bot: /status, /retrain, /models, /promote NAME,
/rollback (or /supportbot status …), the Promote button under a retrain report, and the report a
worker sends back (``send_report``: the table as HTML, then the loss curve with sendPhoto).

Every command and button goes through model.retrain.chat_command (role checked and audited in
core/roles.py; a refusal says why).
"""

from __future__ import annotations

import asyncio
import html
import logging
from pathlib import Path
from typing import Any

from core import texts
from core.settings import Settings

log = logging.getLogger(__name__)

PLATFORM = "telegram"
CALLBACK_PREFIX = "adm:"
CALLBACK_PATTERN = r"^adm:"


def callback(command: str, name: str = "") -> str:
    return f"{CALLBACK_PREFIX}{command}:{name}" if name else f"{CALLBACK_PREFIX}{command}"


def command_of(data: str) -> str | None:
    """"promote NAME", "retrain" or "rollback" from a button's callback data."""
    if not data.startswith(CALLBACK_PREFIX):
        return None
    command, _, name = data[len(CALLBACK_PREFIX):].partition(":")
    return f"{command} {name}".strip() if command in ("promote", "retrain", "rollback") else None


def register(application, *, settings: Settings, db) -> None:  # type: ignore[no-untyped-def]
    """Add the admin handlers; called before the app's own, so these callbacks are matched first."""
    from telegram.ext import CallbackQueryHandler, CommandHandler, filters

    from model.retrain import COMMANDS, chat_command
    from workers.retrain_tasks import enqueue_retrain

    def act(user: str, chat_id: int, text: str):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            with db.session() as session:
                outcome = chat_command(session=session, settings=settings, actor=f"{PLATFORM}:{user}", text=text)
            if outcome.retrain:
                enqueue_retrain(requested_by=f"{PLATFORM}:{user}", targets=[{"platform": PLATFORM, "user": str(chat_id)}])
            return outcome

        return asyncio.to_thread(run)

    async def on_command(update, context) -> None:  # type: ignore[no-untyped-def]
        message = update.message
        command = (message.text or "").split()[0].lstrip("/").split("@")[0].lower()
        words = list(context.args or [])
        text = " ".join(words) if command == "supportbot" else " ".join([command, *words])
        outcome = await act(str(message.from_user.id), message.chat_id, text)
        await message.reply_text(outcome.text, do_quote=True)

    async def on_button(update, context) -> None:  # type: ignore[no-untyped-def]
        query = update.callback_query
        text = command_of(query.data or "")
        if text is None:
            await query.answer()
            return
        chat_id = query.message.chat.id if query.message is not None else query.from_user.id
        outcome = await act(str(query.from_user.id), chat_id, text)
        await query.answer(outcome.text[:200])
        await context.bot.send_message(chat_id=chat_id, text=outcome.text)

    private = filters.ChatType.PRIVATE & filters.UpdateType.MESSAGE
    application.add_handler(CommandHandler([*COMMANDS, "supportbot"], on_command, filters=private))
    application.add_handler(CallbackQueryHandler(on_button, pattern=CALLBACK_PATTERN))


# The worker's side ------------------------------------------------------------------------------------


def report_html(report: dict[str, Any]) -> str:
    from model.retrain import report_text, table_text

    text = html.escape(report_text(report), quote=False)
    if report.get("table"):
        text += "\n\n<pre>" + html.escape(table_text(report), quote=False) + "</pre>"
    return text[:4000]


def report_keyboard(report: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Promote only when the gate passed; nothing otherwise."""
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup

    if report.get("status") != "evaluated" or not report["gate"]["passed"]:
        return None
    return InlineKeyboardMarkup([[InlineKeyboardButton(texts.BUTTON_PROMOTE,
                                                       callback_data=callback("promote", report["version"]))]])


def send_report(outbound, *, chat_id: int, report: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """The report as a message, then the loss curve as a photo, through the worker's Telegram sender."""
    bot = outbound.bot
    outbound._run(bot.send_message(chat_id=chat_id, text=report_html(report), parse_mode="HTML",
                                   reply_markup=report_keyboard(report)))  # fmt: skip
    image = Path(report.get("loss_image") or "")
    if image.is_file():
        outbound._run(bot.send_photo(chat_id=chat_id, photo=image.read_bytes(), filename="loss.png",
                                     caption=texts.ADMIN_LOSS_TITLE.format(name=report["version"])))  # fmt: skip
