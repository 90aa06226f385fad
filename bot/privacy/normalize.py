"""Text normalization before detection, with a map back to the original offsets.

Invisible characters hide values from every detector: "Pr\u200biya" is not a name to spaCy, a phone
number in fullwidth digits is no number to a regex, and "ｐａｓｓｗｏｒｄ" is no cue word. So before
anything is detected:
- zero-width characters, the soft hyphen and bidirectional controls are removed,
- compatibility forms are folded with NFKC where that is safe: only characters whose NFKC form is
  plain ASCII (fullwidth letters and digits, ligatures, no-break spaces) or that sit in the
  halfwidth/fullwidth block. Whole-text NFKC would also recompose other scripts and change what
  people wrote without any gain for detection,
- other control characters become spaces (NUL breaks PostgreSQL text; lone surrogates break encoders).

``Normalized.original_span`` maps a span of the normalized text back to the original text, so
``anonymize --json`` offsets point into what the user sent.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Zero-width space/joiners, word joiner, BOM, soft hyphen, Mongolian vowel separator, and the
# bidirectional marks, embeddings, overrides and isolates (U+200E/F, U+061C, U+202A-E, U+2066-9).
INVISIBLE = frozenset(
    "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"
    "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_NEEDS_WORK = re.compile(
    "[" + "".join(sorted(INVISIBLE)) + r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\u0080-\u00ff"
    r"\u2000-\u206f\ufb00-\ufb4f\uff00-\uffef\U0001d400-\U0001d7ff]"
)


@dataclass(frozen=True)
class Normalized:
    text: str
    # starts[i] / ends[i]: the original characters that normalized character i came from.
    starts: tuple[int, ...] | None  # None: the text is unchanged and offsets are the identity
    ends: tuple[int, ...] | None

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        if self.starts is None or self.ends is None or end <= start:
            return start, end
        return self.starts[start], self.ends[end - 1]


def _fold(ch: str) -> str:
    if ch in INVISIBLE:
        return ""
    if CONTROL.match(ch):
        return " "
    if ch.isascii():
        return ch
    folded = unicodedata.normalize("NFKC", ch)
    if folded == ch:
        return ch
    if (folded.isascii() and folded.isprintable()) or "\uff00" <= ch <= "\uffef":
        return folded
    return ch


def normalize(text: str) -> Normalized:
    """Fast path: most messages hold nothing to fold and keep identity offsets."""
    if not _NEEDS_WORK.search(text):
        return Normalized(text, None, None)
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for i, ch in enumerate(text):
        folded = _fold(ch)
        out.append(folded)
        starts += [i] * len(folded)
        ends += [i + 1] * len(folded)
    return Normalized("".join(out), tuple(starts), tuple(ends))
