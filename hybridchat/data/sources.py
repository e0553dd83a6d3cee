"""Text sources for pretraining: the embedded synthetic world, your own files, FineWeb-Edu.

A source is a function split -> iterable of documents (strings), deterministic so that a resumed run
sees the same stream.
"""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from hybridchat.config import DataConfig, PathsConfig
from hybridchat.errors import UserError
from hybridchat.fsutil import atomic_write_bytes

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"

Source = Callable[[str, int], Iterator[str]]  # (split, epoch) -> documents


def world_config(cfg: DataConfig):
    from hybridchat.data.world import WorldConfig

    return WorldConfig(seed=cfg.world_seed, n_people=cfg.world_people, texts_per_entity=cfg.world_texts_per_entity)


def world_source(cfg: DataConfig) -> Source:
    from hybridchat.data.world import World

    world = World.generate(world_config(cfg))
    texts = {"train": world.pretraining_texts("train"), "val": world.pretraining_texts("val")}

    def docs(split: str, epoch: int) -> Iterator[str]:
        order = list(texts[split])
        if split == "train":  # a fresh order every epoch, the same order on every rank and on resume
            random.Random(cfg.world_seed * 1000 + epoch).shuffle(order)
        return iter(order)

    return docs


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.exists():
        raise UserError(f"data.path={str(path)!r} does not exist; give a file or folder of {', '.join(TEXT_SUFFIXES)}")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"data.path={str(path)!r} holds no {', '.join(TEXT_SUFFIXES)} files")
    return files


def _read(file: Path, text_key: str) -> Iterator[str]:
    if file.suffix in (".txt", ".md"):
        yield file.read_text(encoding="utf-8", errors="replace")
    elif file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    yield record[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{file}:{line_no}: expected a JSON object with a string field "
                                    f"data.text_key={text_key!r} ({type(e).__name__}: {e})") from e
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        if text_key not in pf.schema_arrow.names:
            raise UserError(f"{file}: no column data.text_key={text_key!r}; columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
            yield from batch.column(0).to_pylist()


def files_source(path: Path, cfg: DataConfig) -> Source:
    files = _files(path)
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    every = max(2, round(1 / cfg.val_fraction))

    def docs(split: str, epoch: int) -> Iterator[str]:
        # Every `every`-th document is validation: deterministic and independent of file sizes.
        i = 0
        for file in files:
            for text in _read(file, cfg.text_key):
                if (i % every == 0) == (split == "val"):
                    yield text
                i += 1

    return docs


def download_fineweb(cfg: DataConfig, paths: PathsConfig) -> Path:
    """Fetch the first num_shards FineWeb-Edu shards once (atomic: a partial download never counts)."""
    folder = Path(paths.data) / "fineweb_edu"
    for i in range(cfg.num_shards):
        target = folder / f"shard_{i:05d}.parquet"
        if target.exists():
            continue
        url = FINEWEB_URL.format(i)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                atomic_write_bytes(target, response.read())
        except OSError as e:
            raise UserError(f"data=fineweb_edu: could not download {url} ({e}); with no network, use data=world "
                            f"or data=text data.path=...") from e
    return folder


def build_source(cfg: DataConfig, paths: PathsConfig) -> Source:
    if cfg.name == "world":
        return world_source(cfg)
    if cfg.name == "text":
        if not cfg.path:
            raise UserError("data=text needs data.path=<file or folder of .txt/.md/.jsonl/.parquet>")
        return files_source(Path(cfg.path).expanduser(), cfg)
    if cfg.name == "fineweb_edu":
        return files_source(download_fineweb(cfg, paths), cfg)
    raise UserError(f"data.name={cfg.name!r} is unknown; allowed: world, text, fineweb_edu")
