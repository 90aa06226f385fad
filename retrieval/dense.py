"""The FAISS vector index: exact inner product for small collections, IVF above a size threshold.

Vectors are L2-normalized, so inner product is cosine similarity. Keys are int64 chosen by the
caller (ticket number * VIEWS + view); both index kinds add and remove single keys in place.
IVF rather than HNSW because HNSW cannot remove vectors, and its build at 1M vectors is far
slower on two cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

FLAT = "flat"
IVF = "ivf"
# The share of IVF lists probed per query: recall@10 vs exact search stays above 0.95 on clustered
# data (see bench/retrieval.py) while a 1M index answers in a few milliseconds.
MIN_NPROBE = 16
NPROBE_FRACTION = 1 / 32
TRAIN_POINTS_PER_LIST = 64
MAX_TRAIN_POINTS = 200_000
# Ten k-means rounds place the lists about as well as FAISS's default 25 at 2.5x less build time.
KMEANS_ITERATIONS = 10


def ivf_lists(n: int) -> int:
    """4·sqrt(n) lists, the FAISS rule of thumb, rounded to a power of two; k-means wants >= 39 points a list."""
    lists = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(n))))
    while lists > 16 and lists * 39 > n:
        lists //= 2
    return int(lists)


class DenseIndex:
    def __init__(self, index: faiss.Index, kind: str) -> None:
        self.index = index
        self.kind = kind

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def empty(cls, dim: int) -> DenseIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), FLAT)

    @classmethod
    def build(cls, keys: np.ndarray, vectors: np.ndarray, *, ann_threshold: int, seed: int = 0) -> DenseIndex:
        """Exact search up to ``ann_threshold`` vectors; above it an IVF index trained on them."""
        dim = vectors.shape[1]
        if len(vectors) <= ann_threshold:
            dense = cls.empty(dim)
        else:
            nlist = ivf_lists(len(vectors))
            quantizer = faiss.IndexFlatIP(dim)
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            n_train = min(len(vectors), max(nlist * TRAIN_POINTS_PER_LIST, 10_000), MAX_TRAIN_POINTS)
            rng = np.random.default_rng(seed)
            sample = vectors[rng.choice(len(vectors), n_train, replace=False)] if n_train < len(vectors) else vectors
            ivf.cp.seed = seed
            ivf.cp.niter = KMEANS_ITERATIONS
            ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
            ivf.nprobe = max(MIN_NPROBE, int(nlist * NPROBE_FRACTION))
            # The direct map lets us reconstruct vectors and remove by key cheaply.
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            dense = cls(ivf, IVF)
        dense.add(keys, vectors)
        return dense

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        self.remove(keys)
        self.index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64)
        )

    def remove(self, keys: np.ndarray) -> None:
        if len(keys) and self.index.ntotal:
            keys = np.ascontiguousarray(keys, dtype=np.int64)
            if self.kind == IVF:
                # The IVF direct map (hashtable) removes only through an explicit id array.
                self.index.remove_ids(faiss.IDSelectorArray(len(keys), faiss.swig_ptr(keys)))
            else:
                self.index.remove_ids(faiss.IDSelectorBatch(keys))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) arrays of shape (n_queries, k); missing slots have key -1."""
        if self.index.ntotal == 0:
            empty = np.zeros((len(vectors), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        k = min(k, int(self.index.ntotal))
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (key, vector) pair, to change the index kind without embedding again."""
        if self.kind == FLAT:
            keys = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            flat = faiss.downcast_index(self.index.index)
            return keys, flat.reconstruct_n(0, flat.ntotal)
        invlists = self.index.invlists
        all_keys, all_vectors = [], []
        for lst in range(self.index.nlist):
            size = invlists.list_size(lst)
            if size == 0:
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy()
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * self.index.code_size).copy()
            all_keys.append(ids.astype(np.int64))
            all_vectors.append(codes.view(np.float32).reshape(size, self.dim))
        if not all_keys:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(all_keys), np.concatenate(all_vectors)

    def wants_rebuild(self, ann_threshold: int) -> bool:
        """An exact index grown well past the threshold is turned into IVF (and back when shrunk)."""
        n = len(self)
        if self.kind == FLAT:
            return n > 2 * ann_threshold
        return n < ann_threshold // 2

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> DenseIndex:
        # read_index already returns the concrete class (a downcast copy would not own the memory).
        index = faiss.read_index(str(path))
        return cls(index, IVF if isinstance(index, faiss.IndexIVF) else FLAT)
