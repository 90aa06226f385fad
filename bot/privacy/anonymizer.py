"""The port the adapters call: anonymize before anything is queued, stored, logged or learned from."""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from bot.privacy.config import PrivacyConfig
from bot.privacy.engine import Detection, DetectionEngine
from bot.privacy.normalize import Normalized, normalize
from bot.privacy.pseudonyms import PLACEHOLDER_PATTERN, PseudonymMap, PseudonymStore
from bot.privacy.secrets import SECRET
from core.errors import PrivacyError
from core.types import Anonymized, Entity

_cache: dict[tuple, Anonymizer] = {}
_cache_lock = threading.RLock()  # held while an instance is built, which takes the engine cache too
_latest: Anonymizer | None = None
_instances: weakref.WeakSet[Anonymizer] = weakref.WeakSet()  # the log filter masks every instance's members
SECRET_PLACEHOLDER = "<SECRET>"


class Anonymizer:
    """Presidio's analyzer plus our recognizers, with consistent per-conversation pseudonyms.

    Build it once per process with ``from_settings`` (loading takes a few seconds); calls are fast.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.engine = _engine_for(config)
        _instances.add(self)
        directory = config.data_dir / "privacy" if config.data_dir is not None else None
        self.store = PseudonymStore(directory, config.privacy_key, config.max_scopes)

    @classmethod
    def from_settings(cls, settings: Any) -> Anonymizer:
        """One instance per distinct configuration and process."""
        global _latest
        config = PrivacyConfig.from_settings(settings)
        key = (
            config.entities,
            config.badge_patterns,
            config.hostname_patterns,
            config.allow_terms,
            config.allow_patterns,
            config.known_names,
            config.max_chars,
            config.max_tokens,
            str(config.data_dir),
            config.privacy_key,
            config.name_model,
            config.name_model_path,
            config.name_model_int8,
            config.name_model_bf16,
        )
        with _cache_lock:
            found = _cache.get(key)
            if found is None:
                found = cls(config)
                _cache[key] = found
            _latest = found
            return found

    def add_known_names(self, names: Iterable[str]) -> None:
        """Member directory names (full names, user names): always masked, in any case."""
        self.engine.add_known_names(names)

    def detect(self, text: str) -> list[Detection]:
        """Sensitive spans, with offsets into ``text`` (cut to ``max_chars``)."""
        normalized, detections = self._detect(text)
        return [self._to_original(normalized, d) for d in detections]

    def _detect(self, text: str) -> tuple[Normalized, list[Detection]]:
        """Detection runs on the normalized text (see ``normalize.py``); spans point into that text."""
        if not isinstance(text, str):
            raise PrivacyError(f"anonymize needs text, got {type(text).__name__}")
        try:
            normalized = normalize(bounded(text, self.config.max_chars, self.config.max_tokens))
            return normalized, self.engine.detect(normalized.text)
        except PrivacyError:
            raise
        except Exception as err:  # noqa: BLE001 - the caller must never fall back to the raw text
            raise PrivacyError(f"anonymization failed: {type(err).__name__}") from err

    @staticmethod
    def _to_original(normalized: Normalized, d: Detection) -> Detection:
        start, end = normalized.original_span(d.start, d.end)
        return Detection(d.type, start, end, d.score)

    def anonymize(self, text: str, scope: str | None = None) -> Anonymized:
        """Replace names, contacts and ids with placeholders; same value, same placeholder within ``scope``.

        Input longer than ``max_chars`` (settings.privacy_max_chars, at most settings.max_stored_chars) is
        cut first: that bounds the time one message can take. The returned text is the *normalized* form
        (zero-width and bidi controls removed, fullwidth folded, see ``normalize.py``): what is stored is
        what was checked. Offsets of the returned entities point into the (cut) original text.
        Secrets become ``<SECRET>`` and are never written to the pseudonym map.
        """
        normalized, detections = self._detect(text)
        clean = normalized.text
        if not detections:
            return Anonymized(text=clean, entities=[])
        try:
            masked = self._replace(clean, detections, scope)
        except PrivacyError:
            raise
        except Exception as err:  # noqa: BLE001
            raise PrivacyError(f"anonymization failed: {type(err).__name__}") from err
        entities = [self._to_original(normalized, d) for d in detections]
        return Anonymized(text=masked, entities=[Entity(d.type, d.start, d.end) for d in entities])

    def _replace(self, text: str, detections: list[Detection], scope: str | None) -> str:
        mapping = self.store.get(scope) if scope is not None else PseudonymMap()
        with self.store.lock:
            # Numbered in reading order; detections are sorted and never overlap.
            parts: list[str] = []
            last = 0
            changed = False
            for d in detections:
                if d.type == SECRET:
                    placeholder = SECRET_PLACEHOLDER  # never mapped: nothing can bring it back
                else:
                    placeholder, new = mapping.placeholder(d.type, text[d.start : d.end])
                    changed = changed or new
                parts += [text[last : d.start], placeholder]
                last = d.end
            parts.append(text[last:])
            if changed and scope is not None:
                self.store.save(scope)
        return "".join(parts)

    def reveal(self, text: str, scope: str) -> str:
        """Placeholders back to the values they stand for. Only inside the adapter process, for the user."""
        mapping = self.store.get(scope)
        with self.store.lock:
            originals = dict(mapping.originals)
        return PLACEHOLDER_PATTERN.sub(lambda m: originals.get(m.group(0), m.group(0)), text)

    def scrub(self, text: str) -> str:
        """Second pass for exports: mask what is left as ``<TYPE>``; existing placeholders stay."""
        normalized, detections = self._detect(text)
        clean = normalized.text
        parts, last = [], 0
        for d in detections:
            parts += [clean[last : d.start], f"<{d.type}>"]
            last = d.end
        parts.append(clean[last:])
        return "".join(parts)


_engines: dict[tuple, DetectionEngine] = {}
_TOKEN = re.compile(r"\w+|[^\w\s]")


def bounded(text: str, max_chars: int, max_tokens: int) -> str:
    """The start of ``text`` that is anonymized: at most ``max_chars`` characters and ``max_tokens`` tokens.

    spaCy and the name model cost per token, not per character: binary or symbol-dense input has
    a token per character and would take seconds even under the character limit.
    """
    text = text[:max_chars]
    for count, match in enumerate(_TOKEN.finditer(text), start=1):
        if count > max_tokens:
            return text[: match.start()]
    return text


def _engine_for(config: PrivacyConfig) -> DetectionEngine:
    """spaCy and the name lists load once per process, whatever data_dir or key an instance has."""
    key = (
        config.entities, config.badge_patterns, config.hostname_patterns, config.allow_terms,
        config.allow_patterns, config.known_names, config.spacy_model, config.score_threshold, config.chunk_chars,
        config.name_model, config.name_model_path, config.name_model_int8, config.name_model_bf16,
    )  # fmt: skip
    with _cache_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = DetectionEngine(config)
        return engine


def default_anonymizer() -> Anonymizer:
    """The anonymizer last built with ``from_settings`` in this process, else one with default settings."""
    global _latest
    if _latest is not None:
        return _latest
    with _cache_lock:
        if _latest is None:
            _latest = Anonymizer(PrivacyConfig())
        return _latest


def scrub(text: str) -> str:
    return default_anonymizer().scrub(text)
