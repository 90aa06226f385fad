"""Log redaction: a logging.Filter that masks personal data in every record before a handler writes it.

Cheap by design (regexes only, no spaCy): emails, IPs, IBANs, phone/card numbers, @handles, badge ids,
internal host names and the names of known members (once an Anonymizer in this process was given them).
Free-text names that only the NLP pass finds are not caught here: messages themselves must be logged
after anonymization, never raw. The filter never logs, so it cannot recurse into logging.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from bot.privacy.config import PrivacyConfig
from bot.privacy.structured import StructuredRedactor

_guard = threading.local()


def _redactor_for(config: PrivacyConfig) -> StructuredRedactor:
    extra = [("BADGE_ID", p) for p in config.badge_patterns] + [
        ("HOSTNAME", p) for p in config.hostname_patterns
    ]
    return StructuredRedactor(extra)


def _known_names_patterns() -> list[Any]:
    from bot.privacy import anonymizer

    patterns = [getattr(a.engine.known_names, "_pattern", None) for a in list(anonymizer._instances)]
    return [p for p in patterns if p is not None]


class RedactingFilter(logging.Filter):
    """Rewrites ``record.msg`` (args merged in), the exception text and the stack text, redacted."""

    def __init__(self, config: PrivacyConfig | None = None) -> None:
        super().__init__()
        self.redactor = _redactor_for(config or PrivacyConfig())

    def redact(self, text: str) -> str:
        self.redactor.set_known_names(_known_names_patterns())
        return self.redactor.redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_guard, "active", False):
            return True
        _guard.active = True
        try:
            if getattr(record, "_supportbot_redacted", False):
                return True
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string: keep the template, drop the args
                message = str(record.msg)
            record.msg = self.redact(message)
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.redact(record.stack_info)
            record._supportbot_redacted = True
        except Exception:  # noqa: BLE001 - never break logging; drop the text rather than leak it
            record.msg, record.args = "<log message withheld: redaction failed>", None
            record.exc_info, record.exc_text = None, None
        finally:
            _guard.active = False
        return True


def install_log_redaction(
    target: logging.Logger | logging.Handler | None = None, settings: Any = None
) -> RedactingFilter:
    """Add the redacting filter to a handler, or to a logger and all its handlers (root logger by default).

    A logger's own filters do not see records that propagate up from child loggers, so for a logger the
    filter also goes on each of its handlers. Installing twice is harmless.
    """
    target = target if target is not None else logging.getLogger()
    config = PrivacyConfig.from_settings(settings) if settings is not None else PrivacyConfig()
    existing = next((f for f in target.filters if isinstance(f, RedactingFilter)), None)
    redacting = existing if isinstance(existing, RedactingFilter) else RedactingFilter(config)
    if existing is None:
        target.addFilter(redacting)
    if isinstance(target, logging.Logger):
        for handler in target.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(redacting)
    return redacting
