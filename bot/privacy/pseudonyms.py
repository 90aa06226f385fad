"""Consistent placeholders per conversation: the same person is ``<PERSON_1>`` in every turn.

The map from placeholder back to the real value lives in this process only; it is written to disk
only encrypted (Fernet, key from ``settings.privacy_key``) and never queued, exported or logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from core.errors import PrivacyError

PLACEHOLDER_PATTERN = re.compile(r"<([A-Z][A-Z_]*?)_(\d+)>")


def normalize(entity_type: str, value: str) -> str:
    key = " ".join(value.split()).casefold()
    if entity_type == "PERSON":
        key = key.lstrip("@")
    if entity_type == "PHONE_NUMBER":
        key = re.sub(r"[^\d+]", "", key)
    return key


class PseudonymMap:
    """One conversation's placeholders. Not thread-safe on its own: the store holds the lock."""

    def __init__(self, data: dict | None = None) -> None:
        data = data or {}
        self.counters: dict[str, int] = dict(data.get("counters", {}))
        self.by_key: dict[str, str] = dict(data.get("by_key", {}))  # "TYPE\x00normalized" -> placeholder
        self.originals: dict[str, str] = dict(data.get("originals", {}))  # placeholder -> first surface form

    def to_dict(self) -> dict:
        return {"counters": self.counters, "by_key": self.by_key, "originals": self.originals}

    def placeholder(self, entity_type: str, value: str) -> tuple[str, bool]:
        """The placeholder for ``value``, and whether it is new."""
        norm = normalize(entity_type, value)
        key = f"{entity_type}\x00{norm}"
        if key in self.by_key:
            return self.by_key[key], False
        if entity_type == "PERSON":
            linked = self._same_person(norm)
            if linked is not None:
                self.by_key[key] = linked
                return linked, True
        number = self.counters.get(entity_type, 0) + 1
        self.counters[entity_type] = number
        placeholder = f"<{entity_type}_{number}>"
        self.by_key[key] = placeholder
        self.originals[placeholder] = value
        return placeholder, True

    def _same_person(self, norm: str) -> str | None:
        # "Priya" after "Priya Raman" (or the other way round) is the same person in one conversation.
        parts = set(norm.split())
        for key, placeholder in self.by_key.items():
            entity_type, known = key.split("\x00", 1)
            if entity_type != "PERSON":
                continue
            known_parts = set(known.split())
            if parts and known_parts and (parts <= known_parts or known_parts <= parts):
                return placeholder
        return None


class PseudonymStore:
    """Maps per scope, most recently used kept in memory; persisted encrypted when a key is given."""

    def __init__(
        self, directory: Path | None = None, key: str | None = None, max_scopes: int = 10_000
    ) -> None:
        self.max_scopes = max_scopes
        self._maps: OrderedDict[str, PseudonymMap] = OrderedDict()
        self._lock = threading.RLock()
        self._fernet = None
        self._name_key = b""
        self.directory = None
        if key:
            from cryptography.fernet import Fernet

            self._fernet = Fernet(fernet_key(key))
            self._name_key = hashlib.sha256(b"supportbot-scope-names:" + key.encode()).digest()
            if directory is not None:
                self.directory = Path(directory)

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def _path(self, scope: str) -> Path:
        assert self.directory is not None
        # Scope ids (channel, thread) are not written in clear either.
        name = hmac.new(self._name_key, scope.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return self.directory / f"{name[:40]}.bin"

    def get(self, scope: str) -> PseudonymMap:
        with self._lock:
            found = self._maps.get(scope)
            if found is not None:
                self._maps.move_to_end(scope)
                return found
            loaded = self._load(scope)
            self._maps[scope] = loaded
            while len(self._maps) > self.max_scopes:
                self._maps.popitem(last=False)
            return loaded

    def _load(self, scope: str) -> PseudonymMap:
        if self.directory is None or self._fernet is None:
            return PseudonymMap()
        path = self._path(scope)
        if not path.exists():
            return PseudonymMap()
        from cryptography.fernet import InvalidToken

        try:
            return PseudonymMap(json.loads(self._fernet.decrypt(path.read_bytes())))
        except (InvalidToken, OSError, ValueError) as err:
            raise PrivacyError("a stored pseudonym map could not be read (wrong privacy key?)") from err

    def save(self, scope: str) -> None:
        if self.directory is None or self._fernet is None:
            return
        with self._lock:
            data = json.dumps(self._maps[scope].to_dict()).encode()
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self._path(scope)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(self._fernet.encrypt(data))
                os.replace(tmp, path)
            except OSError as err:
                raise PrivacyError(f"the pseudonym map could not be saved: {err.strerror}") from err


def fernet_key(secret: str) -> bytes:
    """A Fernet key as given, or one derived from any other secret string."""
    raw = secret.encode()
    try:
        if len(base64.urlsafe_b64decode(raw)) == 32:
            return raw
    except ValueError:
        pass
    return base64.urlsafe_b64encode(hashlib.sha256(b"supportbot-privacy-key:" + raw).digest())
