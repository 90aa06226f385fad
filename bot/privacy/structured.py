"""Regex-only detection of structured personal data: cheap, no model, safe to call from a log filter.

Used twice: as extra Presidio recognizers (formats Presidio misses) and, alone, by ``logs.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Span = tuple[str, int, int]

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})+")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9a-fA-F]{1,4}:){2,7}[0-9a-fA-F]{1,4}(?![\w:])")
HANDLE = re.compile(r"(?<![\w@.])@([A-Za-z0-9_][A-Za-z0-9_.-]{1,39}[A-Za-z0-9_])")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
# 7+ digits with the separators phone and card numbers use; an optional extension ("x769").
LONG_NUMBER = re.compile(
    r"(?<![\w./:+-])\+?\(?\d(?:[ .\-()/]{0,3}\d){6,40}(?:[ ]?(?:x|ext\.?)[ ]?\d{1,5})?(?!\w|-\d|[.,:]\d)",
    re.IGNORECASE,
)
NOT_PHONE = re.compile(
    r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|\d+\.\d+(?:\.\d+)*)$"
)
DATE_START = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}\b")
# A UUID's first group can be eight digits (Celery task ids in every worker log line): an identifier,
# not a phone number, and an operator needs it whole to follow a task.
UUID = re.compile(r"(?<![0-9a-f-])[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}(?![0-9a-f-])", re.IGNORECASE)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def iban_valid(value: str) -> bool:
    compact = re.sub(r"\s", "", value).upper()
    if not (15 <= len(compact) <= 34) or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    if not compact.isalnum() or not compact.isascii():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(text: str) -> list[Span]:
    """IBANs in any case and spacing, kept only when the mod-97 checksum holds."""
    found = []
    for match in IBAN.finditer(text):
        parts = match.group().split(" ")
        # Optional spaces can glue a following word on; shrink until the checksum holds.
        while parts:
            candidate = " ".join(parts)
            if iban_valid(candidate):
                found.append(("IBAN_CODE", match.start(), match.start() + len(candidate)))
                break
            parts.pop()
    return found


def find_long_numbers(text: str) -> list[Span]:
    """Phone- and card-like digit runs in any national format ("(37) 788-063", "467 3395").

    Presidio's phone recognizer validates per region and its card recognizer wants known prefixes, so
    local formats slip through. A run of 7+ digits that is not a date, a time or a version is masked:
    in support chat such a number is almost always someone's phone, card or account.
    """
    found = []
    uuids = [m.span() for m in UUID.finditer(text)] if "-" in text else []
    for match in LONG_NUMBER.finditer(text):
        if any(start <= match.start() < end for start, end in uuids):
            continue
        value = match.group().rstrip(" .-/(")
        digits = re.sub(r"\D", "", value)
        if len(digits) < 7 or NOT_PHONE.match(value) or DATE_START.match(value):
            continue
        card = 12 <= len(digits) <= 19 and (luhn_valid(digits) or not re.search(r"[ .()]", value))
        found.append(("CREDIT_CARD" if card else "PHONE_NUMBER", match.start(), match.start() + len(value)))
    return found


class StructuredRedactor:
    """Secrets, emails, IPs, IBANs, phone/card numbers, @handles, badge ids, internal hosts and member names."""

    def __init__(self, extra_patterns: Iterable[tuple[str, str]] = ()) -> None:
        self.extra = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in extra_patterns]
        self.known_names: list[re.Pattern[str]] = []

    def set_known_names(self, patterns: list[re.Pattern[str]]) -> None:
        self.known_names = patterns

    def find(self, text: str) -> list[Span]:
        from bot.privacy.secrets import SECRET, find_secrets

        # Credentials first: they win any overlap (an email inside a connection string).
        secrets: list[Span] = [(SECRET, start, end) for start, end in find_secrets(text)]
        spans: list[Span] = [("EMAIL_ADDRESS", *m.span()) for m in EMAIL.finditer(text)]
        spans += [("IP_ADDRESS", *m.span()) for m in IPV4.finditer(text)]
        spans += [("IP_ADDRESS", *m.span()) for m in IPV6.finditer(text)]
        spans += find_ibans(text)
        spans += find_long_numbers(text)
        spans += [("PERSON", *m.span(1)) for m in HANDLE.finditer(text)]
        for kind, pattern in self.extra:
            for m in pattern.finditer(text):
                group = 1 if pattern.groups and m.group(1) is not None else 0
                spans.append((kind, *m.span(group)))
        for names in self.known_names:
            spans += [("PERSON", *m.span()) for m in names.finditer(text)]
        # Longest first wins an overlap.
        spans.sort(key=lambda s: (-(s[2] - s[1]), s[1]))
        chosen: list[Span] = list(secrets)
        for span in spans:
            if span[2] > span[1] and not any(span[1] < c[2] and c[1] < span[2] for c in chosen):
                chosen.append(span)
        return sorted(chosen, key=lambda s: s[1])

    def redact(self, text: str) -> str:
        parts, last = [], 0
        for kind, start, end in self.find(text):
            parts += [text[last:start], f"<{kind}>"]
            last = end
        parts.append(text[last:])
        return "".join(parts)
