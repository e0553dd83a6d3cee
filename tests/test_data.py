"""Tokenizer, text sources and the token loader."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybridchat.core.errors import UserError
from hybridchat.data.loader import token_batches
from hybridchat.data.sources import DataConfig, files_source, world_source
from hybridchat.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_or_train
from hybridchat.data.world import World, WorldConfig


@pytest.fixture(scope="module")
def world_docs():
    return world_source(World.generate(WorldConfig(n_people=60)))


@pytest.fixture(scope="module")
def tokenizer(world_docs, tmp_path_factory):
    return load_or_train(world_docs("train", 0), 512, 200_000, tmp_path_factory.mktemp("cache"))


def test_tokenizer_round_trips_and_reserves_special_tokens(tokenizer):
    text = "Brabo Kirovith was born in Lageram in 1970. Ünïcode too: 東京 ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = {tokenizer.token_id(t) for t in SPECIAL_TOKENS}
    assert len(ids) == len(SPECIAL_TOKENS)
    assert tokenizer.encode("<|bos|>") != [tokenizer.bos_id]  # special tokens never come from plain text


def test_token_bytes_count_utf8_bytes(tokenizer):
    token_bytes = tokenizer.token_bytes()
    text = "Drokise Works employs 12 pilots in Lageram. ÄÖ"
    ids = tokenizer.encode(text)
    assert int(token_bytes[ids].sum()) == len(text.encode())
    assert int(token_bytes[tokenizer.bos_id]) == 0


def test_tokenizer_is_cached_by_corpus_hash(world_docs, tmp_path):
    a = load_or_train(world_docs("train", 0), 400, 50_000, tmp_path)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    b = load_or_train(world_docs("train", 0), 400, 50_000, tmp_path)
    assert len(files) == 1 and a.fingerprint == b.fingerprint
    load_or_train(world_docs("train", 0), 420, 50_000, tmp_path)  # other settings: another tokenizer
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2


def test_tokenizer_vocab_too_small(world_docs, tmp_path):
    with pytest.raises(UserError, match="data.tokenizer_vocab_size"):
        load_or_train(world_docs("train", 0), 100, 10_000, tmp_path)


def test_corrupted_tokenizer_file_is_named(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text("{ truncated")
    with pytest.raises(UserError, match=str(bad)):
        Tokenizer.load(bad)


def test_loader_shards_batches_across_ranks_and_resumes(world_docs, tokenizer):
    def take(n, **kw):
        stream = token_batches(world_docs, "train", tokenizer, batch_size=2, seq_len=16, **kw)
        return [next(stream)["inputs"] for _ in range(n)]

    single = take(6)
    rank0, rank1 = take(3, rank=0, world_size=2), take(3, rank=1, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(single[0::2], rank0))
    assert all(torch.equal(a, b) for a, b in zip(single[1::2], rank1))
    resumed = take(2, start=4)
    assert torch.equal(resumed[0], single[4]) and torch.equal(resumed[1], single[5])
    batch = next(token_batches(world_docs, "train", tokenizer, 2, 16))
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_world_pretraining_text_has_no_heldout_people(world_docs):
    world = World.generate(WorldConfig(n_people=60))
    heldout = [d.title for d in world.documents() if d.metadata["split"] == "heldout"]
    text = "\n".join(world_docs("train", 0)) + "\n".join(world_docs("val", 0))
    assert heldout and not [name for name in heldout if name in text]


def test_text_sources_read_txt_jsonl_parquet_and_split_val(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}"}) for i in range(5)) + "\n")
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(4)]}), tmp_path / "c.parquet")
    source = files_source(tmp_path, DataConfig(name="text", path=str(tmp_path), val_fraction=0.25))
    train, val = list(source("train", 0)), list(source("val", 0))
    assert len(train) + len(val) == 10 and len(val) == 3
    assert "plain text document" in val and "parquet doc 3" in train + val


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    source = files_source(bad, DataConfig(name="text", path=str(bad), val_fraction=0.5))
    with pytest.raises(UserError, match=r"corpus.jsonl:2"):
        list(source("train", 0))


def test_missing_parquet_column_is_named(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c.parquet")
    source = files_source(tmp_path, DataConfig(name="text", path=str(tmp_path), val_fraction=0.5))
    with pytest.raises(UserError, match="data.text_key='text'"):
        list(source("val", 0))


def test_tokenizer_cache_is_read_not_retrained(tmp_path, monkeypatch):
    from hybridchat.data import tokenizer as tok_module

    texts = [f"The river {i} flows past the old mill and the bridge number {i * 7}." for i in range(200)]
    first = tok_module.load_or_train(iter(texts), 400, 10_000, tmp_path)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cached tokenizer fits")

    monkeypatch.setattr(tok_module.Tokenizer, "train", classmethod(no_training))
    second = tok_module.load_or_train(iter(texts), 400, 10_000, tmp_path)
    assert second.fingerprint == first.fingerprint
    assert second.encode("the old mill") == first.encode("the old mill")
    # ... and it is that file which is read: a damaged cache file is reported, not silently retrained
    cached[0].write_text("{ damaged")
    with pytest.raises(UserError, match=str(cached[0])):
        tok_module.load_or_train(iter(texts), 400, 10_000, tmp_path)
    with pytest.raises(AssertionError, match="retrained"):  # other settings are not cached: they would train
        tok_module.load_or_train(iter(texts), 420, 10_000, tmp_path)


# ---- data loader: packing against a plain reference ----------------------------------------------

class CharTokenizer:
    """Each character is its code point; <|bos|> is 0. Enough to check packing by hand."""

    bos_id = 0

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def reference_batches(docs_per_epoch, batch_size, seq_len, epochs):
    stream = [tok for epoch in range(epochs) for doc in docs_per_epoch(epoch) for tok in [0] + [ord(c) for c in doc]]
    rows = [stream[i:i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len + 1)]
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def test_loader_packs_bos_prefixed_documents_into_rows_like_a_plain_loop():
    from hybridchat.data.loader import token_batches

    def source(split, epoch):  # a different order every epoch, as the world source does
        docs = [f"{split}{epoch}-doc{i}:" + "xyz"[: i % 3 + 1] * (i + 1) for i in range(7)]
        return iter(docs if epoch % 2 == 0 else docs[::-1])

    batch_size, seq_len = 5, 5  # 144 tokens per epoch: 24 rows, 4 whole batches and a partial one
    expected = reference_batches(lambda e: source("train", e), batch_size, seq_len, epochs=3)
    got = token_batches(source, "train", CharTokenizer(), batch_size, seq_len, loop=True)
    for index, rows in enumerate(expected[:12]):
        batch = next(got)
        assert batch["inputs"].shape == batch["targets"].shape == (batch_size, seq_len)
        assert batch["inputs"].tolist() == [r[:-1] for r in rows], index
        assert batch["targets"].tolist() == [r[1:] for r in rows], index
    # one pass (loop=False) stops after the last whole batch of epoch 0, dropping a partial one
    one_pass = reference_batches(lambda e: source("train", e), batch_size, seq_len, 1)
    assert len(one_pass) == 4
    stream = [t for doc in source("train", 0) for t in [0] + [ord(c) for c in doc]]
    assert (len(stream) // (seq_len + 1)) % batch_size != 0  # there is a partial batch to drop
    once = list(token_batches(source, "train", CharTokenizer(), batch_size, seq_len, loop=False))
    assert [b["inputs"].tolist() for b in once] == [[r[:-1] for r in rows] for rows in one_pass]
    # ranks take every world_size-th batch from `start` on
    ranked = token_batches(source, "train", CharTokenizer(), batch_size, seq_len, rank=1, world_size=3, start=2)
    for index in (4, 7, 10):
        assert next(ranked)["inputs"].tolist() == [r[:-1] for r in expected[index]]


def test_loader_with_an_empty_split_names_it():
    from hybridchat.data.loader import token_batches

    with pytest.raises(UserError, match="the 'val' split of the data source yielded no documents"):
        next(token_batches(lambda split, epoch: iter([]), "val", CharTokenizer(), 2, 4, loop=False))


def test_one_pass_ending_exactly_on_a_whole_batch_keeps_its_last_row():
    from hybridchat.data.loader import token_batches

    # 2 documents of 5 characters: 12 tokens with their <|bos|>, exactly 2 rows of seq_len + 1 = 6,
    # one batch of 2 rows; the stream ends with the buffer holding exactly the last row
    docs = ["abcde", "fghij"]
    once = list(token_batches(lambda split, epoch: iter(docs), "train", CharTokenizer(), 2, 5, loop=False))
    assert len(once) == 1
    assert once[0]["inputs"].tolist() == [[0, 97, 98, 99, 100], [0, 102, 103, 104, 105]]
    assert once[0]["targets"].tolist() == [[97, 98, 99, 100, 101], [102, 103, 104, 105, 106]]
