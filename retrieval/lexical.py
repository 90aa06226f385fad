"""BM25 over ticket text, kept as a sparse matrix so single tickets can be added or removed.

Part numbers and error codes ("LIC017", "E-502", "0Y26KX") are where dense embeddings are weakest,
so the tokenizer keeps them whole: "E-502" yields "e502" as well as "502". We do not use bm25s here
because its index cannot take one more document without a rebuild; technicians' resolutions arrive
one by one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from scipy import sparse

K1 = 1.2
B = 0.75

_TOKEN = re.compile(r"[a-z0-9]+(?:[-_./:#][a-z0-9]+)*")
_SPLIT = re.compile(r"[-_./:#]")
STOPWORDS = frozenset(
    ["a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "hi", "hello", "thanks", "thank", "please", "anyone", "any", "help"]
)


def _stem(word: str) -> str:
    # A deliberately tiny stemmer: plural and -ing/-ed forms of the same word should meet.
    if word.isdigit() or len(word) <= 3:
        return word
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: -len(suffix)]
    return word


def code_tokens(text: str) -> list[str]:
    """Tokens that look like part numbers or error codes: letters and digits together ("e502", "lic017")."""
    return [
        t for t in dict.fromkeys(tokenize(text))
        if len(t) >= 3 and any(c.isdigit() for c in t) and any(c.isalpha() for c in t)
    ]


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        token = match.group(0)
        parts = [p for p in _SPLIT.split(token) if p]
        if len(parts) > 1:
            # The joined form keeps a code together ("e-502" -> "e502"); the parts still match alone.
            tokens.append("".join(parts))
        for part in parts:
            if part in STOPWORDS or (len(part) < 2 and not part.isdigit()):
                continue
            tokens.append(_stem(part))
    return tokens


class LexicalIndex:
    """Rows are keyed by the same int64 keys as the dense index; deleted rows are masked, not moved."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.keys = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)
        self.lengths = np.zeros(0, dtype=np.float32)
        self.df = np.zeros(0, dtype=np.int64)
        self._matrix = sparse.csr_matrix((0, 0), dtype=np.float32)
        self._pending: list[dict[int, int]] = []
        self._pending_keys: list[int] = []
        self._row_of: dict[int, int] = {}
        self._csc: sparse.csc_matrix | None = None

    def __len__(self) -> int:
        return int(self.alive.sum())

    # -- changes ---------------------------------------------------------------------------------
    def add(self, keys: list[int], texts: list[str]) -> None:
        for key, text in zip(keys, texts, strict=True):
            self.remove([key])
            counts: dict[int, int] = {}
            for token in tokenize(text):
                col = self.vocab.setdefault(token, len(self.vocab))
                counts[col] = counts.get(col, 0) + 1
            self._pending.append(counts)
            self._pending_keys.append(int(key))
            row = len(self.keys) + len(self._pending) - 1
            self._row_of[int(key)] = row
            if len(self.df) < len(self.vocab):
                self.df = np.concatenate([self.df, np.zeros(len(self.vocab) - len(self.df), np.int64)])
            for col in counts:
                self.df[col] += 1
        self._csc = None

    def remove(self, keys: list[int]) -> None:
        for key in keys:
            row = self._row_of.pop(int(key), None)
            if row is None:
                continue
            self._flush()
            self.alive[row] = False
            start, end = self._matrix.indptr[row], self._matrix.indptr[row + 1]
            self.df[self._matrix.indices[start:end]] -= 1
        self._csc = None

    def _flush(self) -> None:
        if not self._pending:
            return
        n_cols = len(self.vocab)
        indptr = [0]
        indices: list[int] = []
        data: list[float] = []
        for counts in self._pending:
            indices.extend(counts.keys())
            data.extend(counts.values())
            indptr.append(len(indices))
        new = sparse.csr_matrix(
            (np.asarray(data, np.float32), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
            shape=(len(self._pending), n_cols),
        )
        old = self._matrix
        old.resize((old.shape[0], n_cols))
        self._matrix = sparse.vstack([old, new], format="csr")
        self.keys = np.concatenate([self.keys, np.asarray(self._pending_keys, np.int64)])
        self.alive = np.concatenate([self.alive, np.ones(len(self._pending), bool)])
        self.lengths = np.concatenate(
            [self.lengths, np.asarray([sum(c.values()) for c in self._pending], np.float32)]
        )
        self._pending, self._pending_keys = [], []

    def has_terms(self, key: int, tokens: list[str]) -> bool:
        """Whether the row of ``key`` contains every one of ``tokens``."""
        self._flush()
        row = self._row_of.get(int(key))
        if row is None or not tokens:
            return False
        cols = {self.vocab.get(t, -1) for t in tokens}
        start, end = self._matrix.indptr[row], self._matrix.indptr[row + 1]
        return cols <= set(self._matrix.indices[start:end].tolist())

    # -- search ----------------------------------------------------------------------------------
    def search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best (keys, scores), best first; only rows sharing a term with the query."""
        self._flush()
        n_alive = int(self.alive.sum())
        cols = sorted({self.vocab[t] for t in tokenize(text) if t in self.vocab})
        if not cols or n_alive == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self._csc is None:
            self._csc = self._matrix.tocsc()
        avg_len = float(self.lengths[self.alive].mean()) or 1.0
        df = self.df[cols].astype(np.float64)
        idf = np.log(1.0 + (n_alive - df + 0.5) / (df + 0.5))
        sub = self._csc[:, cols].tocoo()
        tf = sub.data.astype(np.float64)
        norm = K1 * (1.0 - B + B * self.lengths[sub.row] / avg_len)
        weights = idf[sub.col] * tf * (K1 + 1.0) / (tf + norm)
        scores = np.bincount(sub.row, weights=weights, minlength=len(self.keys))
        scores[~self.alive] = 0.0
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        hits = hits[np.argsort(-scores[hits], kind="stable")]
        return self.keys[hits], scores[hits].astype(np.float32)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        self._flush()
        m = self._matrix
        np.savez(
            folder / "lexical.npz",
            data=m.data,
            indices=m.indices,
            indptr=m.indptr,
            shape=np.asarray(m.shape, np.int64),
            keys=self.keys,
            alive=self.alive,
            lengths=self.lengths,
            df=self.df,
        )
        (folder / "lexical_vocab.json").write_text(json.dumps(list(self.vocab)), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        index = cls()
        with np.load(folder / "lexical.npz") as arrays:
            shape = tuple(int(x) for x in arrays["shape"])
            index._matrix = sparse.csr_matrix(
                (arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape
            )
            index.keys = arrays["keys"]
            index.alive = arrays["alive"]
            index.lengths = arrays["lengths"]
            index.df = arrays["df"]
        words = json.loads((folder / "lexical_vocab.json").read_text(encoding="utf-8"))
        index.vocab = {w: i for i, w in enumerate(words)}
        index._row_of = {int(k): i for i, k in enumerate(index.keys) if index.alive[i]}
        return index
