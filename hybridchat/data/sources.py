"""Text sources for pretraining: the embedded synthetic world, your own files, FineWeb-Edu.

A source is a function split -> iterable of documents (strings), deterministic so that a resumed run
sees the same stream.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import atomic_write_bytes
from hybridchat.core.seeds import DATA_ORDER, python_rng

if TYPE_CHECKING:
    from hybridchat.data.world import World

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"

Source = Callable[[str, int], Iterator[str]]  # (split, epoch) -> documents


@dataclass
class DataConfig:
    """The `data` node of the config tree (conf/data/*.yaml): the pretraining text and the tokenizer
    trained on it."""
    name: str = "world"                # world (the `world` node) | text | fineweb_edu
    path: Optional[str] = None         # text: a file or folder of .txt/.jsonl/.parquet
    text_key: str = "text"             # field holding the text in jsonl/parquet
    val_fraction: float = 0.02         # text: share of documents held out for validation
    num_shards: int = 8                # fineweb_edu: shards to download (~100 MB each)
    tokenizer_vocab_size: int = 4096
    tokenizer_train_chars: int = 20_000_000


def world_source(world: "World", seed: int | None = None) -> Source:
    """The world's pretraining texts. With a run seed, the training split comes in a fresh order every
    epoch from that seed's data-order stream (the same on every rank and on resume); without one, in
    the world's own order (what the tokenizer is trained on: the same whatever the run seed)."""
    texts = {"train": world.pretraining_texts("train"), "val": world.pretraining_texts("val")}

    def docs(split: str, epoch: int) -> Iterator[str]:
        order = list(texts[split])
        if split == "train" and seed is not None:
            python_rng(seed, DATA_ORDER, "documents", epoch).shuffle(order)
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _text_field(where: str, record: object, text_key: str) -> str:
    """record[text_key] if it is a string, else a UserError naming `where` (file:line or file row)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a string field data.text_key={text_key!r}, "
                        f"got {type(record).__name__}")
    if text_key not in record:
        raise UserError(f"{where}: no field data.text_key={text_key!r} (fields: {sorted(record)[:10]}); "
                        f"set data.text_key to the field holding the text")
    text = record[text_key]
    if not isinstance(text, str):
        raise UserError(f"{where}: field data.text_key={text_key!r} must be a string, got "
                        f"{'null' if text is None else type(text).__name__}")
    return _valid_unicode(text)


def _valid_unicode(text: str) -> str:
    """JSON may escape lone UTF-16 surrogates ("\\ud800"), which no UTF-8 consumer accepts: they
    become U+FFFD, as undecodable bytes of .txt files do."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def read_texts(file: Path, text_key: str) -> Iterator[str]:
    """The texts of one file: a .txt/.md file whole, a .jsonl line's or a .parquet row's `text_key`
    field; anything malformed is a UserError naming the file and line or row."""
    try:
        yield from _read_unchecked(file, text_key)
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror or e})") from None


def _read_unchecked(file: Path, text_key: str) -> Iterator[str]:
    if file.suffix in (".txt", ".md"):
        yield file.read_text(encoding="utf-8", errors="replace")
    elif file.suffix == ".jsonl":
        with file.open("rb") as f:  # decoded per line, so a bad byte is reported at its own line
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{file}:{line_no}: not UTF-8 text ({e.reason} at column {e.start + 1}); "
                                    f"data=text reads UTF-8 JSONL with a string field "
                                    f"data.text_key={text_key!r}") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints, deep nesting
                    raise UserError(f"{file}:{line_no}: expected a JSON object with a string field "
                                    f"data.text_key={text_key!r} ({type(e).__name__}: {_one_line(e)})") from None
                yield _text_field(f"{file}:{line_no}", record, text_key)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UserError(f"{file}: not a readable parquet file ({_one_line(e)})") from None
        if text_key not in names:
            raise UserError(f"{file}: no column data.text_key={text_key!r}; columns are {names}")
        row = 0
        try:
            for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
                column = batch.column(0)
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    raise UserError(f"{file}: column data.text_key={text_key!r} must hold strings, it holds "
                                    f"{column.type}")
                for text in column.to_pylist():
                    if text is None:
                        raise UserError(f"{file}: row {row}: column data.text_key={text_key!r} is null; "
                                        f"every row needs a string")
                    yield text
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{file}: row {row}: parquet data cannot be read ({_one_line(e)})") from None


def files_source(path: Path, cfg: DataConfig) -> Source:
    files = _files(path)
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    every = max(2, round(1 / cfg.val_fraction))

    def docs(split: str, epoch: int) -> Iterator[str]:
        # Every `every`-th document is validation: deterministic and independent of file sizes.
        i = 0
        for file in files:
            for text in read_texts(file, cfg.text_key):
                if (i % every == 0) == (split == "val"):
                    yield text
                i += 1

    return docs


def download_fineweb(cfg: DataConfig, data_dir: Path) -> Path:
    """Fetch the first num_shards FineWeb-Edu shards into data_dir once (atomic: a partial download
    never counts)."""
    folder = data_dir / "fineweb_edu"
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


def build_source(cfg: DataConfig, data_dir: Path, world: Callable[[], "World"], seed: int | None = None) -> Source:
    """The pretraining text source; downloads go under data_dir (paths.data); `world` is called only
    for data=world (the run's one world), whose training texts `seed` (the run's) shuffles every
    epoch (files are read in their order)."""
    if cfg.name == "world":
        return world_source(world(), seed)
    if cfg.name == "text":
        if not cfg.path:
            raise UserError("data=text needs data.path=<file or folder of .txt/.md/.jsonl/.parquet>")
        return files_source(Path(cfg.path).expanduser(), cfg)
    if cfg.name == "fineweb_edu":
        return files_source(download_fineweb(cfg, data_dir), cfg)
    raise UserError(f"data.name={cfg.name!r} is unknown; allowed: world, text, fineweb_edu")
