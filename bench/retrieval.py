"""Ticket index at scale: build time, query latency, ANN recall against exact search, memory.

    python -m bench.retrieval                       # 10k, 100k, 1M
    python -m bench.retrieval --sizes 10000,100000  # quicker
    python -m bench.retrieval --embed               # also time one MiniLM query embedding

Vectors are synthetic (384-dim, clustered like sentence embeddings: many topics, each a cloud of
near-duplicates around its centre, all L2-normalized). Uniform random vectors would be the
worst case for IVF and unlike any text collection. The index kind follows settings.ann_threshold
exactly as the product does (exact below, IVF above). BM25 latency is measured on synthetic
Zipf-distributed token documents up to --lexical-max documents. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

DIM = 384


def synthetic_vectors(n: int, *, seed: int, topics: int = 2000, spread: float = 0.8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, DIM), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        topic = rng.integers(0, topics, m)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) * (spread / np.sqrt(DIM))
        block = centres[topic] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3)}


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_dense(n: int, *, ann_threshold: int, queries: int, depth: int, recall_at: set[int]) -> dict[str, object]:
    import faiss

    from retrieval.dense import DenseIndex

    # Queries come from the same topics as the tickets (held out: they are not in the index).
    everything = synthetic_vectors(n + queries, seed=n)
    vectors, query_vectors = everything[:n], everything[n:]
    keys = np.arange(n, dtype=np.int64)
    before = rss_mib()
    started = time.perf_counter()
    index = DenseIndex.build(keys, vectors, ann_threshold=ann_threshold)
    build_s = time.perf_counter() - started
    index_mib = rss_mib() - before
    latencies = []
    found = []
    for q in query_vectors:
        t0 = time.perf_counter()
        _, ids = index.search(q[None, :], depth)
        latencies.append(time.perf_counter() - t0)
        found.append(ids[0])
    result: dict[str, object] = {
        "n": n,
        "kind": index.kind,
        "build_s": round(build_s, 2),
        "search_depth": depth,
        **percentiles(latencies),
        "index_mib": round(index_mib, 1),
        "vector_mib": round(vectors.nbytes / 2**20, 1),
    }
    if index.kind != "flat" and n in recall_at:
        exact = faiss.IndexFlatIP(DIM)
        exact.add(vectors)
        _, truth = exact.search(query_vectors, 10)
        hits = sum(len(set(truth[i]) & set(found[i][:10])) for i in range(queries))
        result["ann_recall@10_vs_exact"] = round(hits / (10 * queries), 4)
        result["nlist"] = int(index.index.nlist)
        result["nprobe"] = int(index.index.nprobe)
        t0 = time.perf_counter()
        for q in query_vectors[:50]:
            exact.search(q[None, :], depth)
        result["exact_mean_ms"] = round((time.perf_counter() - t0) / 50 * 1000, 3)
    del index, vectors
    return result


def bench_lexical(n: int, *, queries: int, seed: int = 0) -> dict[str, object]:
    from retrieval.lexical import LexicalIndex

    rng = np.random.default_rng(seed)
    vocab = np.asarray([f"w{i}" for i in range(30_000)])
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    docs = [" ".join(vocab[rng.choice(len(vocab), 40, p=weights)]) for _ in range(n)]
    index = LexicalIndex()
    started = time.perf_counter()
    index.add(list(range(n)), docs)
    index.search("w1", 1)  # the first search builds the column view
    build_s = time.perf_counter() - started
    latencies = []
    for i in range(queries):
        query = " ".join(vocab[rng.choice(len(vocab), 8, p=weights)]) + f" w{20_000 + i}"
        t0 = time.perf_counter()
        index.search(query, 100)
        latencies.append(time.perf_counter() - t0)
    return {"n": n, "build_s": round(build_s, 2), **percentiles(latencies)}


def bench_embed(queries: int) -> dict[str, object]:
    from core.settings import load_settings
    from retrieval.embedder import load_embedder

    embedder = load_embedder(load_settings())
    embedder.encode(["warm up"])
    latencies = []
    for i in range(queries):
        t0 = time.perf_counter()
        embedder.encode([f"printer on floor {i} shows E-502 and jams every page"])
        latencies.append(time.perf_counter() - t0)
    return {"model": str(embedder.folder), **percentiles(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated ticket counts")
    parser.add_argument("--ann-threshold", type=int, default=None, help="default: settings.ann_threshold")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--depth", type=int, default=100, help="candidates fetched per query (search uses ~100)")
    parser.add_argument("--lexical-max", type=int, default=100_000, help="largest size for the BM25 bench (0: off)")
    parser.add_argument("--embed", action="store_true", help="also time MiniLM query embedding")
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: default)")
    args = parser.parse_args(argv)

    import faiss

    from core.settings import load_settings

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    threshold = args.ann_threshold if args.ann_threshold is not None else load_settings().ann_threshold
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    report: dict[str, object] = {
        "dim": DIM,
        "ann_threshold": threshold,
        "cpus": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "dense": [],
        "lexical": [],
    }
    for n in sizes:
        print(f"dense index, {n} vectors ...", file=sys.stderr)
        report["dense"].append(  # type: ignore[union-attr]
            bench_dense(n, ann_threshold=threshold, queries=args.queries, depth=args.depth, recall_at=set(sizes))
        )
    for n in sizes:
        if n <= args.lexical_max:
            print(f"BM25, {n} documents ...", file=sys.stderr)
            report["lexical"].append(bench_lexical(n, queries=min(args.queries, 200)))  # type: ignore[union-attr]
    if args.embed:
        report["query_embedding"] = bench_embed(min(args.queries, 100))
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
