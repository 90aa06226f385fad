"""Untrusted text: tickets that read like instructions to an assistant, and what an answer may contain.

Tickets, rating reasons and anything retrieved come from people we do not control, exactly like chat
text. Two checks keep them from steering the bot:

- ``instruction_signals``: at ingest, a ticket that talks to an assistant (override phrases, role-play,
  requests for credentials, "tell the user to mail …") is quarantined instead of indexed;
- ``check_answer``: on every answer, e-mail addresses, links and phone numbers that neither the user
  wrote nor an allow-listed company domain owns are removed, and the answer is flagged.

Both are rules, not a model: they must be explainable to the admin who releases a ticket, and they
run on every ticket of a large import in microseconds.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

# Zero-width and bidi controls hide words from patterns ("ig\u200bnore"); they carry no meaning here.
_INVISIBLE = re.compile(r"[\u00ad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def _plain(text: str) -> str:
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


_I = re.IGNORECASE

# (name, pattern). Each one alone is enough: repair notes never talk to an assistant like this.
INSTRUCTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "override",
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass|skip)\b[^.\n]{0,40}?"
            r"\b(?:previous|prior|above|earlier|preceding|all|any|your|the|these|those|system)\b[^.\n]{0,25}?"
            r"\b(?:instructions?|prompts?|rules|directions|directives|guidelines|guardrails|policies|context)\b",
            _I,
        ),
    ),
    (
        "override",
        re.compile(
            r"\b(?:new|updated|real|actual|hidden|secret)\s+(?:instructions?|system\s+prompt|directives?)\b", _I
        ),
    ),
    ("override", re.compile(r"\bsystem\s+prompt\b|\bdeveloper\s+mode\b|\bjail\s?break|\bdo\s+anything\s+now\b", _I)),
    ("override", re.compile(r"(?:^|\n)\s*(?:system|assistant|###\s*instruction)\s*:", _I)),
    ("override", re.compile(r"<\|?\s*(?:im_start|im_end|system|assistant|eot_id|start_header_id)\s*\|?>|\[/?INST\]", _I)),
    (
        "role_play",
        re.compile(
            r"\byou\s+are\s+now\s+(?:an?\s+|in\s+|my\s+)?(?:\w+\s+)?(?:AI|assistant|bot|model|persona|character|"
            r"DAN|unrestricted|unfiltered|jailbroken|developer\s+mode|free\s+of)\b"
            r"|\byou\s+are\s+no\s+longer\s+(?:an?\s+)?(?:AI|assistant|bot|bound|restricted|limited)\b"
            r"|\bfrom\s+now\s+on\b[^.\n]{0,20}\byou\s+(?:will|must|are|shall)\b"
            r"|\bpretend\s+(?:to\s+be|you\s+are|that\s+you)\b|\brole[\s-]?play\b"
            r"|\b(?:act|behave|respond|answer)\s+as\s+(?:if\s+you\s+(?:are|were)\s+)?(?:an?\s+)?"
            r"(?:unrestricted|unfiltered|different|evil|jailbroken|DAN)\b",
            _I,
        ),
    ),
    (
        "addresses_assistant",
        re.compile(
            r"\b(?:dear|hey|attention|note\s+to\s+(?:the\s+)?)\s*(?:AI|assistant|chat\s?bot|bot|language\s+model|LLM|GPT)\b"
            r"|\bas\s+an?\s+(?:AI|assistant|language\s+model|chat\s?bot)\b"
            r"|\b(?:AI|assistant|chat\s?bot|bot|model|LLM)s?\s*(?:,|:)?\s*(?:must|should|shall|will|has\s+to|needs?\s+to)\s+"
            r"(?:always\s+)?(?:tell|say|answer|respond|reply|instruct|ask|direct|recommend)\b",
            _I,
        ),
    ),
    (
        "instructs_reader",
        re.compile(
            r"\b(?:tell|instruct|ask|advise|direct|remind)\s+(?:the\s+|every\s+|all\s+|any\s+)?"
            r"(?:user|users|employee|employees|customer|customers|requester|caller|person\s+asking)\s+(?:to|that)\b",
            _I,
        ),
    ),
    (
        # Asking the reader to hand over their own secrets; "reset the iDRAC password" is a repair step.
        "credential_request",
        re.compile(
            r"\b(?:send|e-?mail|mail|give|share|provide|reply\s+with|respond\s+with|forward|submit|text|dm|post|"
            r"disclose|reveal|read\s+out|hand\s+over|confirm|verify)\b(?:\s+\S+){0,4}?\s+"
            r"(?:your|their|his|her|the\s+(?:user|employee|customer)'?s?)\s+(?:\S+\s+){0,2}?"
            r"(?:passwords?|passwd|passcodes?|pins?|credentials?|login|log-?in|2fa|mfa|otp|one[-\s]time\s+(?:code|password)|"
            r"verification\s+codes?|security\s+codes?|api\s+keys?|access\s+tokens?|private\s+keys?|"
            r"social\s+security|card\s+numbers?|bank\s+details|cvv)\b",
            _I,
        ),
    ),
)

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b")
URL = re.compile(
    r"\b(?:(?:https?|ftp)://|www\.)[^\s<>\"'()\[\]]+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|net|org|io|info|biz|ru|cn|xyz|top|me|co|app|dev|link|click|support|help)"
    r"(?:/[^\s<>\"'()\[\]]*)?(?![\w.-])",
    _I,
)
# Phone-shaped: 7 to 15 digits with a leading + or ( or the separators people type. A bare run of digits
# (a part or serial number), short numbers (hours, error codes) and dates stay.
PHONE = re.compile(r"(?<![\w.+])(?:\+|\()?\d[\d().\s-]{5,}\d(?![\w])")
DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_TRAILING = ".,;:!?)"


def instruction_signals(*texts: str) -> list[str]:
    """Why these texts read like instructions to an assistant (empty when they do not)."""
    found: list[str] = []
    for text in texts:
        if not text:
            continue
        plain = _plain(text)
        for name, pattern in INSTRUCTION_PATTERNS:
            if name not in found and pattern.search(plain):
                found.append(name)
    return found


def _domain(value: str) -> str:
    value = value.lower()
    if "@" in value:
        value = value.rsplit("@", 1)[1]
    value = re.sub(r"^(?:[a-z]+://)?(?:[^/@]*@)?", "", value)
    return value.split("/", 1)[0].split(":", 1)[0].rstrip(".")


def domain_trusted(value: str, trusted: Iterable[str]) -> bool:
    host = _domain(value)
    return any(host == d or host.endswith("." + d) for d in (t.lower().lstrip(".") for t in trusted) if d)


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


@dataclass
class CheckedAnswer:
    text: str
    removed: list[str] = field(default_factory=list)  # the kinds removed: email, url, phone

    @property
    def flagged(self) -> bool:
        return bool(self.removed)


def check_answer(
    answer: str,
    *,
    user_texts: Iterable[str] = (),
    trusted_domains: Iterable[str] = (),
    keep: Iterable[str] = (),
    replacement: str = "[removed]",
) -> CheckedAnswer:
    """Remove contact points the answer should not carry: e-mail addresses, links and phone numbers that
    appear neither in the user's own messages nor under a trusted domain. ``keep`` lists strings that
    must survive as they are (the cited ticket ids, which may be long numbers)."""
    said = _plain("\n".join(user_texts)).lower()
    said_digits = {_digits(m.group(0)) for m in PHONE.finditer(said)}
    kept = {k for k in keep if k}
    trusted = tuple(trusted_domains)
    removed: list[str] = []

    def allowed(value: str) -> bool:
        return value.lower() in said or domain_trusted(value, trusted)

    def strip_tail(value: str) -> tuple[str, str]:
        core = value.rstrip(_TRAILING)
        return core, value[len(core) :]

    def sub_email(m: re.Match[str]) -> str:
        if allowed(m.group(0)):
            return m.group(0)
        removed.append("email")
        return replacement

    def sub_url(m: re.Match[str]) -> str:
        value, tail = strip_tail(m.group(0))
        if allowed(value):
            return m.group(0)
        removed.append("url")
        return replacement + tail

    def sub_phone(m: re.Match[str]) -> str:
        value = m.group(0).strip()
        digits = _digits(value)
        shaped = value[0] in "+(" or re.search(r"\d[\s().-]+\d", value) is not None
        if (
            not shaped
            or not 7 <= len(digits) <= 15
            or DATE.match(value)
            or digits in said_digits
            or any(digits == _digits(k) for k in kept)
        ):
            return m.group(0)
        removed.append("phone")
        lead = m.group(0)[: len(m.group(0)) - len(m.group(0).lstrip())]
        return lead + replacement

    text = EMAIL.sub(sub_email, _plain(answer))
    text = URL.sub(sub_url, text)
    text = PHONE.sub(sub_phone, text)
    return CheckedAnswer(text=text, removed=removed)
