"""Credentials in text: passwords given in words, API keys and tokens, JWTs, private keys, URLs with credentials.

The token formats come from detect-secrets' plugins (their regexes and its Shannon entropy), the
library secret scanners in CI use; what it has no plugin for (passwords written in prose, Slack app
tokens, fine-grained GitHub tokens, whole PEM blocks, whole connection strings) is added here.
A secret is replaced by the literal ``<SECRET>``: never numbered, never kept in any map, never revealed.

Pure regex work, linear in the text: cheap enough for every message and for the log filter.
"""

from __future__ import annotations

import math
import re
from functools import cache

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector

SECRET = "SECRET"


def _words(text: str) -> list[str]:
    """Word lists are written as one string: easier to read and extend than a list literal."""
    return text.split()


Span = tuple[int, int]

# Token formats detect-secrets has no plugin for (or matches only a prefix of).
_OWN_TOKENS = (
    # URLs with a user and password, where the password holds characters detect-secrets' basic-auth
    # pattern excludes ("!", "$", "&"): people paste them unencoded.
    re.compile(r"(?<![\w.+-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:'\"<>]+:[^\s/@'\"<>]+@[^\s'\"<>]+"),
    re.compile(r"xapp-\d-[A-Za-z0-9]+-\d+-[A-Za-z0-9]+"),  # Slack app-level tokens
    re.compile(r"xox[a-z]-[A-Za-z0-9-]{10,}"),  # Slack tokens in newer layouts
    re.compile(r"github_pat_[A-Za-z0-9_]{40,}"),  # fine-grained GitHub tokens
    re.compile(r"[rs]k_(?:live|test)_[0-9A-Za-z]{16,}"),  # Stripe secret/restricted keys, full length
)
# Characters a token may continue with after a plugin's (sometimes minimal) match.
_TOKEN_TAIL = re.compile(r"[A-Za-z0-9_\-+/=.]*")
_JWT_TAIL = re.compile(r"[A-Za-z0-9_\-.+/=]*")
_PEM_END = re.compile(
    r"-----END [A-Z0-9 ]*-----|---- END SSH2 ENCRYPTED PRIVATE KEY ----|Private-MAC: *[0-9a-fA-F]+"
)
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*$")
_URL_END = re.compile(r"[^\s'\"`<>]*")

# "password is X", "pwd: X", "PIN 1234", "passwd=X": the cue stays readable, the value is masked.
_PASSWORD_CUE = (
    r"(?:pass(?:[ _-]?word)?s?|passwd|pwd|pw|passcode|pass[ _-]?phrase|passwort|kennwort|"
    r"contrase(?:ñ|n)a|senha|mot de passe|пароль|密码|パスワード|비밀번호)"
)
_PIN_CUE = r"(?:pin(?:[ _-]?(?:code|number|no\.?))?)"
_KEY_CUE = (
    r"(?:api[ _-]?key|apikey|access[ _-]?key(?:[ _-]?id)?|secret(?:[ _-]?(?:access[ _-]?)?key)?|"
    r"client[ _-]?secret|(?:auth|access|refresh|bearer|api|session)?[ _-]?token|"
    r"(?:authorization[ \t]*[:=]?[ \t]*)?bearer|authorization|"
    r"private[ _-]?key|signing[ _-]?key|license[ _-]?key|key)"
)
# What joins a cue and its value: "is", "=", ":", "is now", "set to", "for admin is".
_EXPLICIT = (
    r"\s*(?::=|=>|->|[:=])\s*|\s+(?:is|was|are|will be)(?:\s+(?:now|still|set to))?\s+|"
    r"\s+(?:set|changed|reset)\s+to\s+"
)
_JOIN = (
    rf"(?:\s+(?:for|of|on)\s+(?:[\w.@-]{{1,40}}\s+){{0,2}}?[\w.@-]{{1,40}}(?P<join_for>{_EXPLICIT})"
    rf"|(?P<join>{_EXPLICIT}|\s+))"
)
_VALUE = r"(?P<value>\"[^\"\n]{1,80}\"|'[^'\n]{1,80}'|`[^`\n]{1,80}`|[^\s\"'`<>]{1,200})"
# A cue may end a longer name ("aws_secret_access_key", "DB_PASSWORD"): only a letter or digit before it stops it.
PASSWORD = re.compile(rf"(?<![A-Za-z0-9])(?P<cue>{_PASSWORD_CUE}){_JOIN}{_VALUE}", re.IGNORECASE)
PIN = re.compile(
    rf"(?<![\w-])(?P<cue>{_PIN_CUE}){_JOIN}(?P<value>[A-Za-z0-9]{{4,12}})(?![\w-])", re.IGNORECASE
)
KEYED = re.compile(rf"(?<![A-Za-z0-9])(?P<cue>{_KEY_CUE}){_JOIN}{_VALUE}", re.IGNORECASE)

# Words that follow "password is" without being one ("password is expired", "pwd: reset").
_NOT_A_VALUE = frozenset(
    _words("""a an the my your his her our their its this that same is was are be been being not no none nothing
    now still also just only very too so correct incorrect wrong right invalid valid expired expiring expires
    expiry locked unlocked required needed missing empty blank ok okay fine working broken changed reset
    change set weak strong long short case sensitive manager prompt prompts field policy policies
    protected and or but to in on at of for with from by as if when which who will would should can could
    does doesn't didn't isn't wasn't won't don't can't has have had gets got keeps kept being via
    again please here there what where why how yes never always sometimes box screen dialog window
    page form login logon sign signin entered typed accepted rejected saved stored recovery forgotten
    forgot unknown different new old previous current default same? protected, ok. etc
    """)
)
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*(?:_\d+)?>")

_BASE64 = Base64HighEntropyString()
_HEX = HexHighEntropyString()


@cache
def _plugin_patterns() -> tuple[re.Pattern[str], ...]:
    plugins = (
        AWSKeyDetector,
        AzureStorageKeyDetector,
        GitHubTokenDetector,
        GitLabTokenDetector,
        OpenAIDetector,
        PypiTokenDetector,
        SendGridDetector,
        SlackDetector,
        SquareOAuthDetector,
        StripeDetector,
    )
    return tuple(pattern for plugin in plugins for pattern in plugin.denylist)


def high_entropy(value: str) -> bool:
    """A random-looking token, judged with detect-secrets' Shannon entropy on its charset.

    detect-secrets' fixed limits (4.5 bits base64, 3.0 hex) are meant for long strings; a random
    string of n characters cannot exceed log2(n) bits, so shorter tokens get log2(n) - 1 as limit.
    """
    value = value.strip("\"'`")
    if len(value) < 16 or not re.search(r"\d", value) or not re.search(r"[A-Za-z]", value):
        return False
    if re.fullmatch(r"[0-9a-fA-F-]+", value):
        return _HEX.calculate_shannon_entropy(value.lower()) >= _HEX.entropy_limit
    limit = min(_BASE64.entropy_limit, math.log2(len(value)) - 1.0)
    return _BASE64.calculate_shannon_entropy(value) >= limit


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    # Sentence punctuation after a value is not part of it ("my pin is 4821.").
    while end > start and text[end - 1] in ".,;:)]}" and (end == len(text) or not text[end].isalnum()):
        end -= 1
    return start, end


def _word_value_ok(value: str, joined: str) -> bool:
    bare = value.strip("\"'`")
    if not bare or _PLACEHOLDER.fullmatch(bare) or not re.search(r"\w", bare):
        return False
    if value[0] in "\"'`":
        return True
    if bare.lower().rstrip(".,;:!?") in _NOT_A_VALUE:
        return False
    if not joined.strip():
        # No "is"/":"/"=" between cue and value ("password reset"): only a value that is no word.
        # Sentence punctuation after a word ("PASS DOWN.") does not make it one.
        word = bare.rstrip(".,;:!?)")
        return bool(re.search(r"\d", word) and re.search(r"[^\W\d]", word)) or bool(re.search(r"[^\w]", word))
    return True


def find_secrets(text: str) -> list[Span]:
    """Spans of credentials in ``text``, sorted and without overlaps (the longest wins)."""
    spans: list[Span] = []
    for pattern in _plugin_patterns() + _OWN_TOKENS:
        for match in pattern.finditer(text):
            # Only detect-secrets' AWS secret-key pattern captures the value; other groups are prefixes.
            group = 1 if pattern is AWSKeyDetector.denylist[1] else 0
            start, end = match.span(group)
            if group == 0:
                end = _TOKEN_TAIL.match(text, end).end()  # type: ignore[union-attr]
            spans.append((start, end))
    for match in JwtTokenDetector.denylist[0].finditer(text):
        end = _JWT_TAIL.match(text, match.end()).end()  # type: ignore[union-attr]
        if JwtTokenDetector.is_formally_valid(text[match.start() : end].rstrip(".")):
            spans.append(_trim(text, match.start(), end))
    for pattern in PrivateKeyDetector.denylist:
        for match in pattern.finditer(text):
            line_start = text.rfind("\n", 0, match.start()) + 1
            closing = _PEM_END.search(text, match.end())
            spans.append((line_start, closing.end() if closing else len(text)))  # a cut-off key: to the end
    for match in BasicAuthDetector.denylist[0].finditer(text):
        scheme = _URL_START.search(text, 0, match.start())
        start = scheme.start() if scheme else match.start()
        end = _URL_END.match(text, match.end()).end()  # type: ignore[union-attr]
        spans.append(_trim(text, start, end))
    for pattern, check in ((PASSWORD, "word"), (KEYED, "key")):
        position = 0
        while (match := pattern.search(text, position)) is not None:
            # A rejected value may itself be the next cue ("Authorization: Bearer <token>").
            position = match.start("value")
            value = match.group("value")
            if check == "word" and not _word_value_ok(
                value, match.group("join_for") or match.group("join") or ""
            ):
                continue
            bare = value[1:-1] if value[0] in "\"'`" else value
            bearer = match.group("cue").lower().endswith("bearer") and len(bare) >= 12
            if check == "key" and not (bearer or high_entropy(bare)):
                continue
            position = match.end()
            start, end = match.span("value")
            if value[0] not in "\"'`":
                start, end = _trim(text, start, end)
            if end > start:
                spans.append((start, end))
    for match in PIN.finditer(text):
        value = match.group("value")
        if re.search(r"\d", value) and value.lower() not in _NOT_A_VALUE:
            spans.append(match.span("value"))
    spans.sort(key=lambda s: (-(s[1] - s[0]), s[0]))
    chosen: list[Span] = []
    for span in spans:
        if span[1] > span[0] and not any(span[0] < c[1] and c[0] < span[1] for c in chosen):
            chosen.append(span)
    return sorted(chosen)


def contains_secret(text: str) -> bool:
    return bool(find_secrets(text))


def mask_secrets(text: str) -> str:
    """``text`` with every secret replaced by ``<SECRET>``."""
    parts, last = [], 0
    for start, end in find_secrets(text):
        parts += [text[last:start], "<SECRET>"]
        last = end
    parts.append(text[last:])
    return "".join(parts)
