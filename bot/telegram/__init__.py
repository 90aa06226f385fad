"""Telegram: the PTB application with commands, conversations and the rating keyboard (app), HTML
rendering and splitting (render), worker delivery (outbound). Only this package imports telegram."""

from bot.telegram.app import serve

__all__ = ["serve"]
