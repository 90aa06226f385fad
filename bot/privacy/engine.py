"""Detection: Presidio's analyzer over spaCy, fully offline, in bounded time. Returns spans, masks nothing."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bot.privacy.config import CODE_LIKE, DEFAULT_ENTITIES, PrivacyConfig
from bot.privacy.secrets import SECRET, find_secrets
from core.errors import PrivacyError

# Types whose recognizers validate their own matches (checksums, formats); the allow-list never drops them.
STRUCTURED = frozenset(DEFAULT_ENTITIES) - {"PERSON"}
PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*?(?:_\d+)?>")
CODE_TOKEN = re.compile(rf"(?<![\w-]){CODE_LIKE}(?![\w-])")

SPACY_LABELS_IGNORED = [
    "CARDINAL",
    "DATE",
    "EVENT",
    "FAC",
    "GPE",
    "LANGUAGE",
    "LAW",
    "LOC",
    "MONEY",
    "NORP",
    "ORDINAL",
    "ORG",
    "PERCENT",
    "PRODUCT",
    "QUANTITY",
    "TIME",
    "WORK_OF_ART",
]

# Presidio imports its optional Hugging Face recognizers, which pull in transformers and torch and their
# pipelines (10 s) that we never use. Where these are not loaded yet, they are hidden during the import;
# our own name encoder (encoder.py) loads torch afterwards, and not at all with the name model off.
_HIDDEN_WHILE_LOADING = ("torch", "transformers", "gliner", "stanza", "spacy_huggingface_pipelines")


@contextmanager
def without_heavy_optional_modules() -> Iterator[None]:
    hidden = [name for name in _HIDDEN_WHILE_LOADING if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes "import name" raise ImportError
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


@dataclass(frozen=True)
class Detection:
    type: str
    start: int
    end: int
    score: float


def chunks(text: str, size: int) -> Iterator[tuple[int, str]]:
    """Pieces of at most ``size`` characters, cut at a line break or space where there is one."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start + size // 2, end), text.rfind(" ", start + size // 2, end))
            if cut > start:
                end = cut + 1
        yield start, text[start:end]
        start = end


def case_chunks(text: str, size: int) -> Iterator[tuple[int, str]]:
    """``chunks``, but a run of shouted lines and a run of ordinary lines never share a piece.

    Truecasing and the name rules decide "shouting" per piece: a greeting with a name in front of a
    pasted all-caps log must not be read as shouting ("Hi, I'm Priya Raman" + "REMOVED & REPLACED ...").
    """
    from bot.privacy.names import is_all_caps

    start = 0
    state: bool | None = None
    position = 0
    for line in text.splitlines(keepends=True):
        letters = sum(1 for c in line if c.isalpha())
        line_state = is_all_caps(line) if letters >= 8 else state
        if state is not None and line_state is not None and line_state != state and position > start:
            for offset, piece in chunks(text[start:position], size):
                yield start + offset, piece
            start = position
        state = line_state if line_state is not None else state
        position += len(line)
    for offset, piece in chunks(text[start:], size):
        yield start + offset, piece


class DetectionEngine:
    """Presidio AnalyzerEngine with our recognizers; spaCy runs on truecased text (see ``names.py``)."""

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.overlap = True  # name model beside spaCy (see detect); bench/privacy_latency.py turns it off
        self._lock = threading.Lock()
        try:
            with without_heavy_optional_modules():
                self._build()
            if self.name_finder.model is not None:
                # After Presidio's import, which must not see torch (see without_heavy_optional_modules).
                from bot.privacy.encoder import shared_encoder

                # Raises PrivacyError when the model was trained on another base encoder.
                self.name_finder.encoder = shared_encoder(
                    self.name_finder.model,
                    int8=self.config.name_model_int8,
                    bf16=self.config.name_model_bf16,
                )
        except PrivacyError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to build means no anonymization at all
            raise PrivacyError(f"the anonymizer could not be loaded: {err}") from err

    def _build(self) -> None:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            UsSsnRecognizer,
        )

        from bot.privacy.gazetteer import load_gazetteer
        from bot.privacy.names import NameFinder
        from bot.privacy.person_model import load_person_model
        from bot.privacy.recognizers import (
            ChatPersonRecognizer,
            GroupPatternRecognizer,
            HandleRecognizer,
            KnownNamesRecognizer,
            LongNumberRecognizer,
            LooseIbanRecognizer,
            OfflineEmailRecognizer,
        )
        from bot.privacy.scripts import ScriptNameFinder, load_script_names

        config = self.config
        self.gazetteer = load_gazetteer()
        provider = NlpEngineProvider(
            nlp_configuration={
                "nlp_engine_name": "spacy",
                "models": [{"lang_code": "en", "model_name": config.spacy_model}],
                # Only PERSON is taken from spaCy (by ChatPersonRecognizer, which reads the Doc itself).
                "ner_model_configuration": {"labels_to_ignore": SPACY_LABELS_IGNORED},
            }
        )
        self.nlp_engine = provider.create_engine()
        nlp = self.nlp_engine.nlp["en"]
        # The dependency parser is the slowest part and nothing here reads its trees.
        if "parser" in nlp.pipe_names:
            nlp.disable_pipe("parser")
        wanted = config.name_model and "PERSON" in config.entities
        name_model = load_person_model(config.name_model_path) if wanted else None
        self.name_finder = NameFinder(self.gazetteer, config.allow_terms, name_model)
        self.script_names = ScriptNameFinder(load_script_names())
        self.known_names = KnownNamesRecognizer(self.gazetteer, config.allow_terms)
        self.known_names.add(config.known_names)
        recognizers: list[Any] = [
            OfflineEmailRecognizer(),
            PhoneRecognizer(),
            CreditCardRecognizer(),
            IbanRecognizer(),
            LooseIbanRecognizer(),
            LongNumberRecognizer(),
            IpRecognizer(),
            UsSsnRecognizer(),
            GroupPatternRecognizer("BADGE_ID", config.badge_patterns),
            GroupPatternRecognizer("HOSTNAME", config.hostname_patterns),
            HandleRecognizer(),
            self.known_names,
            ChatPersonRecognizer(self.name_finder),
        ]
        recognizers = [r for r in recognizers if set(r.supported_entities) & set(config.entities)]
        registry = RecognizerRegistry(recognizers=recognizers)
        self.analyzer = AnalyzerEngine(
            registry=registry, nlp_engine=self.nlp_engine, supported_languages=["en"]
        )
        allow = "|".join(re.escape(term) for term in sorted(config.allow_terms, key=len, reverse=True))
        patterns = [rf"(?<!\w)(?:{allow})(?!\w)"] if allow else []
        patterns += list(config.allow_patterns)
        self.allow_pattern = (
            re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None
        )

    def add_known_names(self, names: Iterable[str]) -> None:
        self.known_names.add(names)

    def detect(self, text: str) -> list[Detection]:
        """Sensitive spans of ``text`` (already capped and normalized), sorted, without overlaps."""
        from bot.privacy.names import is_all_caps

        found: list[Detection] = []
        encoder = self.name_finder.encoder if self.overlap else None
        with self._lock:
            pieces = [(o, p) for o, p in case_chunks(text, self.config.chunk_chars) if p.strip()]
            # The name model reads the pieces that are not shouted (names.NameFinder.find): start it
            # now, beside spaCy's pass, instead of after it.
            encoded = [p for _, p in pieces if encoder is not None and not is_all_caps(p)]
            for piece in encoded:
                encoder.prefetch(piece)
            try:
                found += self._analyze(pieces)
            finally:
                for piece in encoded:
                    encoder.forget(piece)
        if SECRET in self.config.entities:
            found += [Detection(SECRET, start, end, 1.0) for start, end in find_secrets(text)]
        if "PERSON" in self.config.entities:
            found += [Detection("PERSON", start, end, 0.85) for start, end in self.script_names.find(text)]
        return self._clean(text, found)

    def _analyze(self, pieces: list[tuple[int, str]]) -> list[Detection]:
        from bot.privacy.names import truecase

        found: list[Detection] = []
        for offset, piece in pieces:
            artifacts = self.nlp_engine.process_text(truecase(piece, self.gazetteer), "en")
            results = self.analyzer.analyze(
                text=piece,
                language="en",
                entities=[e for e in self.config.entities if e != SECRET],  # secrets: find_secrets
                nlp_artifacts=artifacts,
                score_threshold=self.config.score_threshold,
            )
            found += [Detection(r.entity_type, r.start + offset, r.end + offset, r.score) for r in results]
        return found

    def _clean(self, text: str, found: list[Detection]) -> list[Detection]:
        protected = [m.span() for m in PLACEHOLDER.finditer(text)]
        if self.allow_pattern is not None:
            allowed = [m.span() for m in self.allow_pattern.finditer(text)]
        else:
            allowed = []
        codes = [m.span() for m in CODE_TOKEN.finditer(text)]

        def overlaps(d: Detection, spans: list[tuple[int, int]]) -> bool:
            return any(d.start < e and s < d.end for s, e in spans)

        kept = []
        for d in found:
            if d.end <= d.start or overlaps(d, protected):
                continue
            # STRUCTURED includes SECRET: a token that looks like a part number is still a key.
            if d.type not in STRUCTURED and (overlaps(d, allowed) or overlaps(d, codes)):
                continue  # product names, model numbers and error codes are never people
            kept.append(d)
        # Overlaps: secrets first (a password that looks like a name, a URL or an email inside a
        # connection string), then validated types, then the longer span, then the higher score.
        kept.sort(key=lambda d: (d.type != SECRET, d.type not in STRUCTURED, -(d.end - d.start), -d.score))
        chosen: list[Detection] = []
        for d in kept:
            if not any(d.start < c.end and c.start < d.end for c in chosen):
                chosen.append(d)
        chosen.sort(key=lambda d: d.start)
        # Same type separated only by spaces is one entity ("Priya" + "Raman").
        merged: list[Detection] = []
        for d in chosen:
            if (
                merged
                and merged[-1].type == d.type == "PERSON"
                and not text[merged[-1].end : d.start].strip()
            ):
                last = merged[-1]
                merged[-1] = Detection(d.type, last.start, d.end, max(last.score, d.score))
            else:
                merged.append(d)
        return merged
