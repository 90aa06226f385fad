"""Presidio recognizers of our own: chat names, member deny-list, handles, configurable patterns, offline email."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from functools import cache

import tldextract
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import EmailRecognizer

from bot.privacy import structured
from bot.privacy.gazetteer import Gazetteer
from bot.privacy.names import NameFinder

# Known members' name parts more common than this as words ("Will", "Grant") are only masked in full.
MEMBER_PART_MAX_ZIPF = 4.5


@cache
def offline_tld_extractor() -> tldextract.TLDExtract:
    """The Public Suffix List snapshot bundled with tldextract: no download, no cache directory."""
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer, but its domain check never goes to the network.

    The stock one calls ``tldextract.extract``, which downloads the suffix list on first use.
    """

    def validate_result(self, pattern_text: str) -> bool:
        return offline_tld_extractor()(pattern_text).fqdn != ""


class GroupPatternRecognizer(EntityRecognizer):
    """Regexes whose group 1 (if present) is the sensitive part, so cue words stay readable ("badge 12345")."""

    def __init__(
        self, entity: str, patterns: Iterable[str], score: float = 0.85, name: str | None = None
    ) -> None:
        self.patterns = [re.compile(pattern, re.IGNORECASE) for pattern in patterns]
        self.score = score
        super().__init__(supported_entities=[entity], name=name or f"{entity.title()}PatternRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
        results = []
        for pattern in self.patterns:
            for match in pattern.finditer(text):
                group = 1 if match.re.groups >= 1 and match.group(1) is not None else 0
                start, end = match.span(group)
                if end > start:
                    results.append(RecognizerResult(self.supported_entities[0], start, end, self.score))
        return results


class HandleRecognizer(GroupPatternRecognizer):
    """@handles are people. The "@" stays outside the mask: "@<PERSON_1>" still reads as a mention."""

    def __init__(self) -> None:
        super().__init__("PERSON", [structured.HANDLE.pattern], 0.8, "HandleRecognizer")


class KnownNamesRecognizer(EntityRecognizer):
    """The workspace's member directory as a deny-list: full names, their rarer parts and user names."""

    def __init__(self, gazetteer: Gazetteer, allow_terms: Iterable[str] = ()) -> None:
        self.gazetteer = gazetteer
        self.allow_terms = {term.lower() for term in allow_terms}
        self._terms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        super().__init__(supported_entities=["PERSON"], name="KnownNamesRecognizer")

    def load(self) -> None:
        pass

    def add(self, names: Iterable[str]) -> None:
        terms = set()
        for raw in names:
            name = " ".join(str(raw).split()).strip().lstrip("@")
            if len(name) < 2 or name.lower() in self.allow_terms:
                continue
            terms.add(name.lower())
            parts = re.split(r"[\s.]+", name)
            if len(parts) > 1:
                for part in parts:
                    if (
                        len(part) >= 3
                        and part.isalpha()
                        and part.lower() not in self.allow_terms
                        and self.gazetteer.zipf(part) < MEMBER_PART_MAX_ZIPF
                    ):
                        terms.add(part.lower())
        if not terms - self._terms:
            return
        with self._lock:
            self._terms |= terms
            alternation = "|".join(re.escape(term) for term in sorted(self._terms, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<![\w@])(?:{alternation})(?!\w)", re.IGNORECASE)

    def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
        pattern = self._pattern
        if pattern is None:
            return []
        return [RecognizerResult("PERSON", m.start(), m.end(), 0.95) for m in pattern.finditer(text)]


class ChatPersonRecognizer(EntityRecognizer):
    """People's names from spaCy's analysis of the truecased text plus name lists and cue words."""

    def __init__(self, finder: NameFinder) -> None:
        self.finder = finder
        super().__init__(supported_entities=["PERSON"], name="ChatPersonRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
        if nlp_artifacts is None or nlp_artifacts.tokens is None:
            return []
        return [
            RecognizerResult("PERSON", span.start, span.end, span.score)
            for span in self.finder.find(nlp_artifacts.tokens, text)
        ]


class LooseIbanRecognizer(EntityRecognizer):
    """IBANs in any case and spacing ("gb42 nawi 0445 ..."), accepted only when the mod-97 check passes."""

    def __init__(self) -> None:
        super().__init__(supported_entities=["IBAN_CODE"], name="LooseIbanRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
        return [RecognizerResult(kind, start, end, 0.9) for kind, start, end in structured.find_ibans(text)]


class LongNumberRecognizer(EntityRecognizer):
    """Any phone- or card-like run of digits in any national format: see ``structured.find_long_numbers``."""

    def __init__(self) -> None:
        super().__init__(supported_entities=["PHONE_NUMBER", "CREDIT_CARD"], name="LongNumberRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
        return [
            RecognizerResult(kind, start, end, 0.5) for kind, start, end in structured.find_long_numbers(text)
        ]
