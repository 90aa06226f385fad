"""Slack: inbound conversion and message rules (inbound), the Bolt app with buttons, modal and slash
command (app), Block Kit rendering (render), worker delivery (outbound), transports (server).

Only this package imports slack_bolt / slack_sdk."""

from bot.slack.server import serve

__all__ = ["serve"]
