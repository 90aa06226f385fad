"""The ticket index the worker uses: hybrid dense + BM25 search over resolved tickets, kept in step with SQL.

Files under ``settings.index_dir``::

    CURRENT          name of the published snapshot folder (replaced atomically: the version stamp)
    STALE            present when SQL changed but the index could not follow; the next user repairs it
    writer.lock      serializes writers across processes (flock)
    snap-<n>-<rand>/ dense.faiss, lexical.npz, lexical_vocab.json, meta.json (immutable once published)

A reader checks CURRENT (one small file read) before each search and reloads when another process
published a newer snapshot. Every few seconds it also compares a cheap SQL stamp (count, newest
update) so tickets written by code that never touched the index are picked up too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from core.db import Database
from core.errors import RetrievalError
from core.schema import Ticket
from core.settings import Settings
from core.types import SearchResult, TicketHit
from retrieval import store
from retrieval.dense import DenseIndex
from retrieval.embedder import Embedder, load_embedder
from retrieval.lexical import LexicalIndex, code_tokens, tokenize
from retrieval.store import TicketIn

if TYPE_CHECKING:
    from retrieval.ingest import Anonymize

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Each ticket is embedded as a few views; a query matches a ticket through its best view.
VIEWS = 4
VIEW_DOCUMENT = 0  # everything the ticket says
VIEW_PROBLEM = 1  # title/machine/condition only: close to how an employee describes the trouble
# Reciprocal-rank fusion: weights of the dense and lexical rankings, and the usual damping constant.
# BM25 alone is much weaker than the embeddings on how people describe trouble (Dell forum set:
# recall@5 0.40 vs 0.60), so its ranking mostly breaks near-ties; chosen by 5-fold CV there
# (0.1: tuned recall@5 0.66, 0.5: 0.62).
DENSE_WEIGHT = 1.0
LEXICAL_WEIGHT = 0.1
# Error codes and part numbers are the exception: a ticket holding every code of the query gets up
# to a dense rank-1 share, scaled by how much of the query those codes are ("LIC017": all of it).
CODE_WEIGHT = 1.0
RRF_K = 60
CANDIDATES = 50
# Confidence is a logistic function of the best hit's cosine similarity, nudged up when BM25 agrees.
CONFIDENCE_MIDPOINT = 0.45
CONFIDENCE_SLOPE = 12.0
LEXICAL_AGREEMENT_BONUS = 0.1
# A ticket naming the very error code / part number the user typed is strong evidence on its own.
CODE_MATCH_BONUS = 0.5
SQL_CHECK_INTERVAL_S = 5.0
KEEP_SNAPSHOTS = 2


def ticket_views(ticket: TicketIn) -> list[tuple[int, str]]:
    views = [(VIEW_DOCUMENT, store.document_text(ticket))]
    problem = store.problem_text(ticket)
    if problem and ticket.work_performed:
        views.append((VIEW_PROBLEM, problem))
    return views


def collection_hash(digests: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for ticket_id in sorted(digests):
        digest.update(f"{ticket_id}\x1f{digests[ticket_id]}\n".encode())
    return digest.hexdigest()


def _confidence(cosine: float, lexical_agrees: bool, code_match: bool = False) -> float:
    value = 1.0 / (1.0 + np.exp(-CONFIDENCE_SLOPE * (cosine - CONFIDENCE_MIDPOINT)))
    if lexical_agrees:
        value += LEXICAL_AGREEMENT_BONUS * (1.0 - value)
    if code_match:
        value += CODE_MATCH_BONUS * (1.0 - value)
    return float(min(1.0, max(0.0, value)))


@dataclass
class Snapshot:
    """What one published version holds in memory."""

    name: str
    dense: DenseIndex
    lexical: LexicalIndex
    # ticket id -> [ticket number, content hash]; the number gives the FAISS keys.
    tickets: dict[str, list[Any]] = field(default_factory=dict)
    next_number: int = 0
    model: str = ""
    store_stamp: list[Any] = field(default_factory=list)
    dirty: bool = False

    def number_to_id(self) -> dict[int, str]:
        return {int(entry[0]): ticket_id for ticket_id, entry in self.tickets.items()}


class TicketIndex:
    """Hybrid search over the ticket store. One per process; thread-safe."""

    def __init__(self, *, settings: Settings, db: Database, embedder: Embedder) -> None:
        self.settings = settings
        self.db = db
        self.embedder = embedder
        self.folder = settings.index_dir
        self._lock = threading.RLock()
        self._snap: Snapshot | None = None
        self._numbers: dict[int, str] = {}
        self._last_sql_check = 0.0

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, *, settings: Settings, db: Database, embedder: Embedder | None = None,
             progress: bool = False) -> TicketIndex:
        """Load the persisted index, repairing or rebuilding it when it does not match SQL."""
        settings.index_dir.mkdir(parents=True, exist_ok=True)
        index = cls(settings=settings, db=db, embedder=embedder or load_embedder(settings))
        try:
            index._refresh(force_check=True, progress=progress)
        except RetrievalError:
            index.mark_stale()
            raise
        except Exception as err:
            index.mark_stale()
            raise RetrievalError(f"the ticket index could not be opened: {err}") from err
        return index

    @property
    def ann_threshold(self) -> int:
        return int(self.settings.ann_threshold)

    def _current_name(self) -> str | None:
        try:
            return (self.folder / "CURRENT").read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _load(self, name: str) -> Snapshot:
        path = self.folder / name
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise RetrievalError(f"index {path} has format {meta.get('format')}, expected {FORMAT_VERSION}")
        return Snapshot(
            name=name,
            dense=DenseIndex.load(path / "dense.faiss"),
            lexical=LexicalIndex.load(path),
            tickets=meta["tickets"],
            next_number=int(meta["next_number"]),
            model=meta["model"],
            store_stamp=meta.get("store_stamp", []),
        )

    def _install(self, snap: Snapshot) -> None:
        self._snap = snap
        self._numbers = snap.number_to_id()

    def refresh(self) -> None:
        """Follow the newest snapshot now (``search`` does it too): lets a caller keep the SQL checks and
        the writer lock off a thread that must not wait on them."""
        self._refresh()

    def _refresh(self, *, force_check: bool = False, progress: bool = False) -> None:
        """Follow the newest published snapshot; repair when it is stale or does not match SQL."""
        with self._lock:
            name = self._current_name()
            if name is not None and (self._snap is None or self._snap.name != name):
                try:
                    self._install(self._load(name))
                except (OSError, ValueError, KeyError, RuntimeError, RetrievalError) as err:
                    log.warning("index snapshot %s unreadable (%s); rebuilding from SQL", name, err)
                    self._snap = None
            now = time.monotonic()
            needs_check = force_check or (self.folder / "STALE").exists()
            if not needs_check and now - self._last_sql_check >= SQL_CHECK_INTERVAL_S:
                self._last_sql_check = now
                with self.db.session() as session:
                    needs_check = self._snap is None or list(store.store_stamp(session=session)) != list(
                        self._snap.store_stamp
                    )
            if needs_check or self._snap is None or self._snap.model != self.embedder.fingerprint:
                self._last_sql_check = now
                self.reconcile(progress=progress)

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer(self) -> Iterator[Snapshot]:
        """Exclusive across processes: load the newest snapshot, let the caller change it, publish it."""
        with self._lock, open(self.folder / "writer.lock", "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                name = self._current_name()
                if name is not None and (self._snap is None or self._snap.name != name):
                    try:
                        self._install(self._load(name))
                    except (OSError, ValueError, KeyError, RuntimeError, RetrievalError) as err:
                        log.warning("index snapshot %s unreadable (%s); starting empty", name, err)
                        self._snap = None
                snap = self._snap
                if snap is None or snap.model != self.embedder.fingerprint:
                    snap = Snapshot(
                        name="",
                        dense=DenseIndex.empty(self.embedder.dim),
                        lexical=LexicalIndex(),
                        model=self.embedder.fingerprint,
                    )
                    self._snap = snap
                    self._numbers = {}
                yield snap
                if snap.dirty or not snap.name:
                    self._publish(snap)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _publish(self, snap: Snapshot) -> None:
        if snap.dense.wants_rebuild(self.ann_threshold):
            keys, vectors = snap.dense.vectors()
            snap.dense = DenseIndex.build(keys, vectors, ann_threshold=self.ann_threshold)
        with self.db.session() as session:
            snap.store_stamp = list(store.store_stamp(session=session))
        existing = [int(p.name.split("-")[1]) for p in self.folder.glob("snap-*") if p.is_dir()]
        number = max(existing, default=0) + 1
        name = f"snap-{number:08d}-{secrets.token_hex(3)}"
        tmp = self.folder / f".{name}.tmp"
        tmp.mkdir(parents=True)
        try:
            snap.dense.save(tmp / "dense.faiss")
            snap.lexical.save(tmp)
            meta = {
                "format": FORMAT_VERSION,
                "model": snap.model,
                "tickets": snap.tickets,
                "next_number": snap.next_number,
                "count": len(snap.tickets),
                "content_hash": collection_hash({k: v[1] for k, v in snap.tickets.items()}),
                "dense_kind": snap.dense.kind,
                "store_stamp": snap.store_stamp,
                "created": time.time(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            os.replace(tmp, self.folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = self.folder / f".CURRENT.{os.getpid()}"
        pointer.write_text(name, encoding="utf-8")
        os.replace(pointer, self.folder / "CURRENT")  # the atomic version switch readers look at
        snap.name = name
        snap.dirty = False
        self._numbers = snap.number_to_id()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / "STALE").unlink()
        self._prune(keep=name)

    def _prune(self, *, keep: str) -> None:
        # Older snapshots go, except the previous one: a reader may be loading it right now.
        snaps = sorted(p for p in self.folder.glob("snap-*") if p.is_dir())
        for path in snaps[:-KEEP_SNAPSHOTS]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.folder.glob(".snap-*.tmp"):
            if time.time() - path.stat().st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)

    def _apply(self, snap: Snapshot, *, tickets: list[TicketIn], removed: Iterable[str], progress: bool) -> None:
        """Change the in-memory snapshot: remove ``removed`` ids, (re)embed and add ``tickets``."""
        gone = [tid for tid in removed if tid in snap.tickets]
        for ticket in tickets:
            if ticket.id in snap.tickets:
                gone.append(ticket.id)
        if gone or tickets:
            snap.dirty = True
        if gone:
            numbers = [int(snap.tickets[tid][0]) for tid in gone]
            keys = np.asarray([n * VIEWS + v for n in numbers for v in range(VIEWS)], np.int64)
            snap.dense.remove(keys)
            snap.lexical.remove([n * VIEWS for n in numbers])
            for tid in gone:
                del snap.tickets[tid]
        if not tickets:
            return
        texts: list[str] = []
        keys_list: list[int] = []
        lexical_keys: list[int] = []
        lexical_texts: list[str] = []
        for ticket in tickets:
            number = snap.next_number
            snap.next_number += 1
            snap.tickets[ticket.id] = [number, ticket.content_hash]
            for view, text in ticket_views(ticket):
                keys_list.append(number * VIEWS + view)
                texts.append(text)
            lexical_keys.append(number * VIEWS)
            lexical_texts.append(store.document_text(ticket))
        vectors = self._embed(texts, progress=progress)
        keys = np.asarray(keys_list, np.int64)
        if len(snap.dense) == 0 and len(keys) > self.ann_threshold:
            snap.dense = DenseIndex.build(keys, vectors, ann_threshold=self.ann_threshold)
        else:
            snap.dense.add(keys, vectors)
        snap.lexical.add(lexical_keys, lexical_texts)

    def _embed(self, texts: list[str], *, progress: bool) -> np.ndarray:
        if not progress or len(texts) <= 256:
            return self.embedder.encode(texts)
        from tqdm import tqdm

        chunks = []
        with tqdm(total=len(texts), desc="embedding tickets", unit="text") as bar:
            for start in range(0, len(texts), 256):
                chunks.append(self.embedder.encode(texts[start : start + 256]))
                bar.update(min(256, len(texts) - start))
        return np.concatenate(chunks)

    def index_changes(self, *, changed: list[str], removed: list[str], progress: bool = False) -> None:
        """Bring the index in line with SQL after a committed change. On failure the index is marked stale."""
        try:
            with self.db.session() as session:
                fresh = store.get_tickets(session=session, ids=changed)
            with self._writer() as snap:
                # Ids that vanished from SQL meanwhile are removed, not indexed.
                self._apply(
                    snap,
                    tickets=[fresh[tid] for tid in changed if tid in fresh],
                    removed=list(removed) + [tid for tid in changed if tid not in fresh],
                    progress=progress,
                )
        except Exception as err:
            self.mark_stale()
            raise RetrievalError(f"tickets were saved but the index could not be updated: {err}") from err

    def mark_stale(self) -> None:
        with contextlib.suppress(OSError):
            (self.folder / "STALE").write_text(str(time.time()), encoding="utf-8")

    def reconcile(self, *, progress: bool = False) -> dict[str, int]:
        """Compare the index with SQL (ids and content hashes) and fix only what differs."""
        with self.db.session() as session:
            digests = store.ticket_digests(session=session)
        with self._writer() as snap:
            changed = [tid for tid, digest in digests.items() if snap.tickets.get(tid, [None, None])[1] != digest]
            removed = [tid for tid in snap.tickets if tid not in digests]
            if changed:
                with self.db.session() as session:
                    fresh = store.get_tickets(session=session, ids=changed)
                tickets = [fresh[tid] for tid in changed if tid in fresh]
            else:
                tickets = []
            if len(snap.tickets) == 0 and len(tickets) > 0:
                log.info("building the ticket index from %d tickets", len(tickets))
            self._apply(snap, tickets=tickets, removed=removed, progress=progress)
        return {"embedded": len(tickets), "removed": len(removed), "total": len(digests)}

    def rebuild(self, *, progress: bool = False) -> dict[str, int]:
        """Throw the index away and build it again from SQL."""
        with self._lock:
            with open(self.folder / "writer.lock", "a+") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    with contextlib.suppress(FileNotFoundError):
                        (self.folder / "CURRENT").unlink()
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
            self._snap = None
            self._numbers = {}
            return self.reconcile(progress=progress)

    # -- the API the worker uses -----------------------------------------------------------------
    def upsert(self, *, tickets: Iterable[Mapping[str, Any] | Ticket | TicketIn], source: str = "technician",
               anonymize: Anonymize | None = None) -> list[str]:
        """Add or update tickets in SQL (one transaction), then in the index. Returns the changed ids.

        A technician's resolution is untrusted text like any ticket: it is anonymized and screened
        here, and one that reads like instructions to an assistant is quarantined, not indexed."""
        from retrieval.ingest import screen_ticket, store_screened, stored_limit, ticket_anonymizer

        max_chars = stored_limit(self.settings)
        valid = [store.validate_ticket(t, max_chars=max_chars, source=source) for t in tickets]
        anonymize = anonymize or ticket_anonymizer(self.settings)
        screened = [screen_ticket(t, anonymize) for t in valid]
        with self.db.session() as session:
            outcome = store_screened(session=session, screened=screened)
        if outcome.changed:
            self.index_changes(changed=outcome.changed, removed=[])
        return outcome.changed

    def delete(self, *, ids: Iterable[str]) -> list[str]:
        with self.db.session() as session:
            deleted = store.delete_tickets(session=session, ids=ids)
        if deleted:
            self.index_changes(changed=[], removed=deleted)
        return deleted

    def __len__(self) -> int:
        return len(self._snap.tickets) if self._snap else 0

    def status(self) -> dict[str, Any]:
        snap = self._snap
        return {
            "snapshot": snap.name if snap else None,
            "tickets": len(snap.tickets) if snap else 0,
            "vectors": len(snap.dense) if snap else 0,
            "kind": snap.dense.kind if snap else None,
            "model": str(self.embedder.folder),
            "stale": (self.folder / "STALE").exists(),
        }

    def search(self, query: str, k: int | None = None) -> SearchResult:
        """The k best tickets for a question, and how sure we are the best one fits (0..1)."""
        k = k or self.settings.retrieval_k
        query = (query or "").strip()[: self.settings.max_message_chars]
        if not query:
            return SearchResult(hits=[], confidence=0.0)
        try:
            self._refresh()
        except RetrievalError:
            raise
        except Exception as err:
            raise RetrievalError(f"the ticket index could not be loaded: {err}") from err
        vector = self.embedder.encode([query])
        # Under the lock: an upsert in another thread of this process changes the FAISS index in place.
        with self._lock:
            snap, numbers = self._snap, self._numbers
            if snap is None or not snap.tickets:
                return SearchResult(hits=[], confidence=0.0)
            ranked = self._rank(snap, numbers, query, vector, k)
        if not ranked:
            return SearchResult(hits=[], confidence=0.0)
        with self.db.session() as session:
            rows = store.get_tickets(session=session, ids=[tid for tid, _ in ranked])
        hits = [
            TicketHit(
                id=tid,
                title=row.title,
                machine=row.machine,
                condition=row.condition,
                work_performed=row.work_performed,
                hours=row.hours,
                score=round(score, 4),
            )
            for tid, score in ranked
            if (row := rows.get(tid)) is not None  # deleted meanwhile by another process
        ]
        return SearchResult(hits=hits, confidence=hits[0].score if hits else 0.0)

    def rank_ids(self, query: str, k: int) -> list[str]:
        """Only ids, no SQL round trip: used by the evaluation."""
        self._refresh()
        vector = self.embedder.encode([query])
        with self._lock:
            snap, numbers = self._snap, self._numbers
            if snap is None:
                return []
            return [tid for tid, _ in self._rank(snap, numbers, query, vector, k)]

    def _rank(self, snap: Snapshot, numbers: dict[int, str], query: str, vector: np.ndarray,
              k: int) -> list[tuple[str, float]]:
        depth = max(CANDIDATES, 4 * k)
        scores, keys = snap.dense.search(vector, depth * 2)
        dense_best: dict[int, float] = {}
        for score, key in zip(scores[0], keys[0], strict=True):
            if key < 0:
                continue
            number = int(key) // VIEWS
            if number not in dense_best or score > dense_best[number]:
                dense_best[number] = float(score)
        dense_order = sorted(dense_best, key=lambda n: -dense_best[n])[:depth]
        lex_keys, _ = snap.lexical.search(query, depth)
        lexical_order = [int(key) // VIEWS for key in lex_keys]
        fused: dict[int, float] = {}
        for rank, number in enumerate(dense_order):
            fused[number] = fused.get(number, 0.0) + DENSE_WEIGHT / (RRF_K + rank + 1)
        codes = code_tokens(query)
        code_share = len(codes) / max(1, len(tokenize(query)))
        for rank, number in enumerate(lexical_order):
            fused[number] = fused.get(number, 0.0) + LEXICAL_WEIGHT / (RRF_K + rank + 1)
            if codes and snap.lexical.has_terms(number * VIEWS, codes):
                fused[number] += CODE_WEIGHT * code_share / (RRF_K + 1)
        order = sorted(fused, key=lambda n: -fused[n])[:k]
        lexical_top = set(lexical_order[:3])
        missing = [n for n in order if n not in dense_best]
        if missing:
            # A lexical-only hit still needs its cosine for the confidence: score it exactly.
            dense_best.update(self._exact_scores(snap, vector[0], missing))
        result = []
        for number in order:
            tid = numbers.get(number)
            if tid is None:
                continue
            code_match = bool(codes) and snap.lexical.has_terms(number * VIEWS, codes)
            result.append((tid, _confidence(dense_best.get(number, 0.0), number in lexical_top, code_match)))
        return result

    def _exact_scores(self, snap: Snapshot, vector: np.ndarray, numbers: list[int]) -> dict[int, float]:
        found: dict[int, float] = {}
        for number in numbers:
            best = 0.0
            for view in range(VIEWS):
                try:
                    stored = snap.dense.index.reconstruct(number * VIEWS + view)
                except RuntimeError:
                    continue
                best = max(best, float(np.dot(stored, vector)))
            found[number] = best
        return found
