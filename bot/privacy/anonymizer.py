"""The port the adapters call: anonymize before anything is queued, stored, logged or learned from."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

from bot.privacy.config import PrivacyConfig
from bot.privacy.engine import Detection, DetectionEngine, sanitize, without_heavy_optional_modules
from bot.privacy.pseudonyms import PLACEHOLDER_PATTERN, PseudonymMap, PseudonymStore
from core.errors import PrivacyError
from core.types import Anonymized, Entity

_cache: dict[tuple, Anonymizer] = {}
_cache_lock = threading.RLock()  # held while an instance is built, which takes the engine cache too
_latest: Anonymizer | None = None
_instances: weakref.WeakSet[Anonymizer] = weakref.WeakSet()  # the log filter masks every instance's members


class Anonymizer:
    """Presidio analyzer + anonymizer with consistent per-conversation pseudonyms.

    Build it once per process with ``from_settings`` (loading takes a few seconds); calls are fast.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.engine = _engine_for(config)
        with without_heavy_optional_modules():
            from presidio_anonymizer import AnonymizerEngine

            self.presidio = AnonymizerEngine()
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
            str(config.data_dir),
            config.privacy_key,
            config.name_model,
            config.name_model_path,
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
        try:
            return self.engine.detect(sanitize(text[: self.config.max_chars]))
        except PrivacyError:
            raise
        except Exception as err:  # noqa: BLE001 - the caller must never fall back to the raw text
            raise PrivacyError(f"anonymization failed: {type(err).__name__}") from err

    def anonymize(self, text: str, scope: str | None = None) -> Anonymized:
        """Replace names, contacts and ids with placeholders; same value, same placeholder within ``scope``.

        Input longer than ``max_chars`` (settings.max_stored_chars) is cut first, as the store cuts it.
        Offsets of the returned entities point into the (cut) original text.
        """
        if not isinstance(text, str):
            raise PrivacyError(f"anonymize needs text, got {type(text).__name__}")
        clean = sanitize(text[: self.config.max_chars])
        detections = self.detect(clean)
        if not detections:
            return Anonymized(text=clean, entities=[])
        try:
            masked = self._replace(clean, detections, scope)
        except PrivacyError:
            raise
        except Exception as err:  # noqa: BLE001
            raise PrivacyError(f"anonymization failed: {type(err).__name__}") from err
        return Anonymized(text=masked, entities=[Entity(d.type, d.start, d.end) for d in detections])

    def _replace(self, text: str, detections: list[Detection], scope: str | None) -> str:
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        mapping = self.store.get(scope) if scope is not None else PseudonymMap()
        with self.store.lock:
            # Numbered in reading order (Presidio replaces from the end backwards).
            chosen: dict[tuple[str, str], str] = {}
            changed = False
            for d in detections:
                value = text[d.start : d.end]
                if (d.type, value) not in chosen:
                    chosen[(d.type, value)], new = mapping.placeholder(d.type, value)
                    changed = changed or new

            def pseudonym(entity_type: str):  # type: ignore[no-untyped-def]
                return lambda value: chosen[(entity_type, value)]

            operators = {
                t: OperatorConfig("custom", {"lambda": pseudonym(t)}) for t in {d.type for d in detections}
            }
            results = [RecognizerResult(d.type, d.start, d.end, d.score) for d in detections]
            masked = self.presidio.anonymize(text=text, analyzer_results=results, operators=operators).text
            if changed and scope is not None:
                self.store.save(scope)
        return masked

    def reveal(self, text: str, scope: str) -> str:
        """Placeholders back to the values they stand for. Only inside the adapter process, for the user."""
        mapping = self.store.get(scope)
        with self.store.lock:
            originals = dict(mapping.originals)
        return PLACEHOLDER_PATTERN.sub(lambda m: originals.get(m.group(0), m.group(0)), text)

    def scrub(self, text: str) -> str:
        """Second pass for exports: mask what is left as ``<TYPE>``; existing placeholders stay."""
        clean = sanitize(text[: self.config.max_chars])
        detections = self.detect(clean)
        parts, last = [], 0
        for d in detections:
            parts += [clean[last : d.start], f"<{d.type}>"]
            last = d.end
        parts.append(clean[last:])
        return "".join(parts)


_engines: dict[tuple, DetectionEngine] = {}


def _engine_for(config: PrivacyConfig) -> DetectionEngine:
    """spaCy and the name lists load once per process, whatever data_dir or key an instance has."""
    key = (
        config.entities, config.badge_patterns, config.hostname_patterns, config.allow_terms,
        config.allow_patterns, config.known_names, config.spacy_model, config.score_threshold, config.chunk_chars,
        config.name_model, config.name_model_path,
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
