"""Finding people's names in noisy chat text, where stock spaCy NER misses most of them.

Chat is lower-cased ("ask emma"), shouted ("PRINTER BROKEN AGAIN"), full of @handles and nicknames.
Three things lift recall well above spaCy alone without masking product names:
1. ``truecase``: before spaCy runs, lower-case words that are first names and not common English words
   get a capital ("emma" -> "Emma"), and an all-caps message is lower-cased first, so spaCy's NER sees
   names the way it was trained to. Lengths never change, so offsets stay those of the original.
2. Evidence rules over spaCy's tokens: name lists, word frequency, part of speech and cue words
   ("my name is", "ask", "cc", "thanks", "hi").
3. Extension: a first name pulls in the surname beside it ("justin bieber").
Every threshold here was tuned on WNUT-17 train and the DellQA forum set, never on the evaluation sets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.privacy.gazetteer import Gazetteer

if TYPE_CHECKING:
    from bot.privacy.encoder import TokenEncoder
    from bot.privacy.person_model import PersonModel

# A first name becomes a candidate below this word frequency (Zipf) when lower-case...
LOWER_NAME_MAX_ZIPF = 4.6
# ...and below this one when written with a capital, where the capital itself is evidence.
TITLE_NAME_MAX_ZIPF = 5.6
# A capitalised surname on its own (not beside a first name) must be rarer than this as a word.
SURNAME_MAX_ZIPF = 3.6
# A word beside a name joins it when it is a surname rarer than this ("justin bieber").
NEIGHBOUR_MAX_ZIPF = 4.2
# spaCy PERSON entities are kept when some token has name evidence or is a rare capitalised word.
RARE_WORD_MAX_ZIPF = 3.2

CUE_WORDS = {
    "ask",
    "asked",
    "asking",
    "cc",
    "thanks",
    "thank",
    "thx",
    "ty",
    "hi",
    "hey",
    "hello",
    "dear",
    "ping",
    "pinged",
    "tell",
    "told",
    "call",
    "called",
    "email",
    "emailed",
    "message",
    "dm",
    "contact",
    "contacted",
    "mr",
    "mrs",
    "ms",
    "miss",
    "dr",
    "sir",
    "madam",
    "colleague",
    "manager",
    "boss",
    "coworker",
}
TITLES = {
    "mr",
    "mrs",
    "ms",
    "miss",
    "dr",
    "prof",
    "sir",
    "madam",
    "coach",
    "officer",
    "uncle",
    "aunt",
    "auntie",
}
NAME_PHRASES = re.compile(
    r"\b(?:my name is|my name's|name is|i am called|i'm called|call me|this is)\s+$", re.I
)
NAME_POS = {"PROPN", "NOUN", "ADJ", "X", "INTJ"}
# Names only in the international list (not the census) are often words elsewhere ("manual", "kit"):
# they need to be rarer in English to count.
INTERNATIONAL_MAX_ZIPF = 3.6
# spaCy entity labels that rule a token out as a person ("Sunday", "London", "January").
NOT_PERSON_LABELS = {"DATE", "TIME", "CARDINAL", "ORDINAL", "MONEY", "PERCENT", "QUANTITY"}
PLACE_LABELS = {"GPE", "LOC", "NORP", "LANGUAGE"}
# All-caps text ("REMOVED ROD END, REPLACED HOSE") hides the capital letter, the best evidence; only
# census first names rarer than this as words count there, besides cues and the member list.
SHOUT_MAX_ZIPF = 3.0
# spaCy often calls rare first names places ("Tanya" GPE); its label only counts for common words.
PLACE_NAME_MIN_ZIPF = 4.0
# On name lists, but in chat they are greetings, fillers, months and days.
NOT_NAMES = set(
    [
        "hi",
        "hey",
        "hello",
        "oh",
        "ah",
        "ok",
        "okay",
        "yo",
        "ya",
        "yeah",
        "yes",
        "no",
        "lol",
        "omg",
        "thanks",
        "thx",
        "pls",
        "please",
        "sir",
        "madam",
        "guys",
        "folks",
        "team",
        "all",
        "everyone",
        "anyone",
        "someone",
        "dear",
        "bro",
        "dude",
        "man",
        "girl",
        "boy",
        "baby",
        "babe",
        "love",
        "honey",
        "mom",
        "mum",
        "dad",
        "jan",
        "feb",
        "mar",
        "apr",
        "may",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "january",
        "february",
        "march",
        "april",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "mon",
        "tue",
        "tues",
        "wed",
        "thu",
        "thur",
        "thurs",
        "fri",
        "sat",
        "sun",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "today",
        "tomorrow",
        "tonight",
        "ly",
        "gon",
        "na",
        "wanna",
        "gonna",
        "imma",
        "til",
        "tho",
        "dat",
        "wit",
        "tha",
        "da",
        "ma",
        "pa",
    ]
)
WORDLIKE = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


def is_all_caps(text: str) -> bool:
    upper = sum(1 for c in text if c.isupper())
    lower = sum(1 for c in text if c.islower())
    return upper >= 8 and upper > 3 * lower


def _lower_same_length(text: str) -> str:
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def truecase(text: str, gazetteer: Gazetteer) -> str:
    """Text for spaCy: names capitalised, shouting lowered. Same length as ``text``."""
    shouting = is_all_caps(text)
    base = _lower_same_length(text) if shouting else text
    chars = None
    for match in re.finditer(r"(?<![\w@])[a-z]{2,}\b", base):
        word = match.group()
        limit = LOWER_NAME_MAX_ZIPF if gazetteer.is_census_first_name(word) else INTERNATIONAL_MAX_ZIPF
        if shouting:
            limit = SHOUT_MAX_ZIPF if gazetteer.is_census_first_name(word) else 0.0
        if word not in NOT_NAMES and gazetteer.is_first_name(word) and gazetteer.zipf(word) < limit:
            if chars is None:
                chars = list(base)
            chars[match.start()] = chars[match.start()].upper()
    return "".join(chars) if chars is not None else base


@dataclass(frozen=True)
class NameSpan:
    start: int
    end: int
    score: float
    why: str


class NameFinder:
    """Decides which tokens of a spaCy Doc (run on ``truecase(text)``) are people's names."""

    def __init__(
        self,
        gazetteer: Gazetteer,
        allow_terms: Iterable[str] = (),
        model: PersonModel | None = None,
        encoder: TokenEncoder | None = None,
    ) -> None:
        self.gazetteer = gazetteer
        self.allow_terms = {term.lower() for term in allow_terms}
        self.model = model
        self.encoder = encoder

    def _word_ok(self, word: str) -> bool:
        return bool(WORDLIKE.fullmatch(word)) and word.lower() not in self.allow_terms

    def _first_name_evidence(self, token, original: str, shouting: bool) -> bool:  # type: ignore[no-untyped-def]
        word = original
        if len(word) < 2 or not self._word_ok(word) or not self.gazetteer.is_first_name(word):
            return False
        if word.lower() in NOT_NAMES:
            return False
        if token.ent_type_ in NOT_PERSON_LABELS:
            return False
        if (
            token.ent_type_ in PLACE_LABELS
            and not self.gazetteer.is_census_first_name(word)
            and self.gazetteer.zipf(word) >= PLACE_NAME_MIN_ZIPF
        ):
            return False  # "London", "America": spaCy's place label wins unless it is a common first name
        if not shouting and word.isupper() and len(word) <= 4:
            return False  # acronyms: SAS, NIC, ISO
        zipf = self.gazetteer.zipf(word)
        titled = not shouting and word[0].isupper()
        if len(word) == 2 and not (titled and self.gazetteer.is_census_first_name(word)):
            return False
        limit = TITLE_NAME_MAX_ZIPF if titled else LOWER_NAME_MAX_ZIPF
        if not self.gazetteer.is_census_first_name(word):
            limit = min(limit, INTERNATIONAL_MAX_ZIPF + (1.0 if titled else 0.0))
        if shouting:
            limit = SHOUT_MAX_ZIPF if self.gazetteer.is_census_first_name(word) else 0.0
        if zipf >= limit:
            return False
        if token.pos_ in NAME_POS:
            return True
        return titled and zipf < LOWER_NAME_MAX_ZIPF

    def find(self, doc, text: str) -> list[NameSpan]:  # type: ignore[no-untyped-def]
        """``doc`` is spaCy's analysis of ``truecase(text)``; offsets are into ``text``."""
        shouting = is_all_caps(text)
        tokens = list(doc)
        originals = [text[t.idx : t.idx + len(t.text)] for t in tokens]
        marked = self.rule_marks(doc, originals, text, shouting)
        self._extend(tokens, originals, shouting, marked)
        # All-caps text has lost the capital letters the model leans on; there the rules alone decide.
        if self.model is not None and self.encoder is not None and not shouting:
            candidates = self.model.candidates(tokens, originals, marked, self._word_ok)
            if candidates:
                spans = [(tokens[i].idx, tokens[i].idx + len(tokens[i].text)) for i in candidates]
                vectors, covered = self.encoder.vectors(text, spans)
                candidates = [i for i, ok in zip(candidates, covered) if ok]
                found = self.model.marks(
                    tokens, originals, marked, self.gazetteer, shouting, candidates, vectors[covered]
                )
                marked.update(found)
                self._extend(tokens, originals, shouting, marked)
        return self._spans(tokens, text, marked)

    def rule_marks(self, doc, originals: list[str], text: str, shouting: bool) -> dict[int, tuple[float, str]]:  # type: ignore[no-untyped-def]
        """Token index -> (score, rule) for tokens the hand-written rules call names."""
        gaz = self.gazetteer
        tokens = list(doc)
        marked: dict[int, tuple[float, str]] = {}

        def mark(i: int, score: float, why: str) -> None:
            if i not in marked or marked[i][0] < score:
                marked[i] = (score, why)

        # spaCy PERSON entities, kept only with name evidence: spaCy also calls "Network Card" a person.
        for ent in doc.ents:
            if ent.label_ != "PERSON":
                continue
            idx = [t.i for t in ent if self._word_ok(originals[t.i])]
            if len(idx) != len([t for t in ent if not t.is_punct]):
                continue  # a code, a number or an allowed product inside: not a person
            if shouting:
                evidence = any(
                    gaz.is_census_first_name(originals[i]) and gaz.zipf(originals[i]) < SHOUT_MAX_ZIPF
                    for i in idx
                )
            else:
                evidence = any(
                    gaz.is_first_name(originals[i])
                    or gaz.is_last_name(originals[i])
                    or (originals[i][:1].isupper() and gaz.zipf(originals[i]) < RARE_WORD_MAX_ZIPF)
                    for i in idx
                )
            if evidence:
                for i in idx:
                    mark(i, 0.85, "spacy")

        for i, token in enumerate(tokens):
            word = originals[i]
            if self._first_name_evidence(token, word, shouting):
                mark(i, 0.7, "first-name")
                continue
            if (
                not shouting
                and i > 0
                and word[:1].isupper()
                and word[1:].islower()
                and token.pos_ == "PROPN"
                and gaz.is_last_name(word)
                and gaz.zipf(word) < SURNAME_MAX_ZIPF
                and self._word_ok(word)
                and not tokens[i - 1].is_sent_start
                and originals[i - 1] not in {".", "!", "?", ":"}
            ):
                mark(i, 0.6, "surname")

        # Cue words and phrases: the next word is a name if it is not a common word.
        for i, token in enumerate(tokens[:-1]):
            nxt = i + 1
            if originals[nxt] == "@" and nxt + 1 < len(tokens):
                nxt += 1
            word = originals[nxt]
            if not self._word_ok(word) or tokens[nxt].is_stop or word.lower() in NOT_NAMES:
                continue
            cue = token.lower_ in CUE_WORDS or bool(NAME_PHRASES.search(text[: tokens[nxt].idx]))
            if not cue:
                continue
            if not shouting and word.isupper() and len(word) > 1:
                continue  # acronyms after "with", "cc": PERC, SAS
            titled = word[:1].isupper() and not shouting
            limit = TITLE_NAME_MAX_ZIPF if (titled or token.lower_ in TITLES) else LOWER_NAME_MAX_ZIPF
            if shouting and not (
                (gaz.is_first_name(word) or gaz.is_last_name(word)) and gaz.zipf(word) < PLACE_NAME_MIN_ZIPF
            ):
                continue
            if gaz.zipf(word) < limit and (
                gaz.is_first_name(word)
                or gaz.is_last_name(word)
                or titled
                or gaz.zipf(word) < RARE_WORD_MAX_ZIPF
            ):
                mark(nxt, 0.6, "cue")

        return marked

    def _extend(self, tokens, originals, shouting: bool, marked: dict[int, tuple[float, str]]) -> None:  # type: ignore[no-untyped-def]
        """Neighbours of a name that are surnames, initials or rare capitalised words join it."""
        gaz = self.gazetteer
        changed = True
        while changed:
            changed = False
            for i in sorted(marked):
                for j in (i - 1, i + 1):
                    if j < 0 or j >= len(tokens) or j in marked:
                        continue
                    word = originals[j]
                    if not self._word_ok(word) or tokens[j].is_stop or word.lower() in NOT_NAMES:
                        continue
                    zipf = gaz.zipf(word)
                    titled = word[:1].isupper() and not shouting
                    surname = gaz.is_last_name(word) and zipf < (
                        SHOUT_MAX_ZIPF if shouting else NEIGHBOUR_MAX_ZIPF
                    )
                    rare_title = titled and zipf < RARE_WORD_MAX_ZIPF + 0.8
                    initial = titled and len(word) == 1
                    if (
                        j > i
                        and (surname or rare_title or initial)
                        or j < i
                        and (
                            word.lower() in TITLES
                            or (titled and (gaz.is_first_name(word) or zipf < PLACE_NAME_MIN_ZIPF))
                        )
                    ):
                        marked[j] = (marked[i][0] - 0.05, "neighbour")
                        changed = True

    def _spans(self, tokens, text: str, marked: dict[int, tuple[float, str]]) -> list[NameSpan]:  # type: ignore[no-untyped-def]
        spans: list[NameSpan] = []
        for i in sorted(marked):
            token = tokens[i]
            start, end = token.idx, token.idx + len(token.text)
            score, why = marked[i]
            if spans and i - 1 in marked and text[spans[-1].end : start].strip() in {"", "."}:
                last = spans[-1]
                spans[-1] = NameSpan(last.start, end, max(last.score, score), last.why)
            else:
                spans.append(NameSpan(start, end, score, why))
        return spans
