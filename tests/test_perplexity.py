"""`python -m hybridchat.bench perplexity`: bits per byte of a checkpoint on held-out text.

The reference is independent of the bench's windows and token-bytes table: the model reads each
document alone, position by position log-softmax in a plain loop, and the bytes are the documents'
own UTF-8 bytes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridchat.bench import perplexity
from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["The lantern hung above the harbour mouth from 1862 until 1907.",
             "Keepers said its green lens could be seen eleven miles out — on a clear night.",
             "Minutes of the council: the bridge repairs were approved, 5 votes to 2."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small random hybrid (every weight random, so each position's prediction differs) saved as
    run `ppl`, stage `pretrain`, with a tokenizer trained on other text."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_pattern="AM", sequence_len=64,
                      d_state=16, headdim=16, chunk_size=8)
    tokenizer = Tokenizer.train(["some other text about ships, councils and numbers 0123456789"] * 20, 300)
    model = HybridLM(cfg, vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    meta = {"config": {"model": cfg.__dict__}, "run_name": "ppl", "stage": "pretrain",
            "tokenizer": tokenizer.fingerprint}
    out = tmp_path_factory.mktemp("ppl")
    path = checkpoint.save(out / "ppl" / "pretrain", 1, model, [], meta, keep=1, tokenizer=tokenizer)
    text = out / "docs.jsonl"
    text.write_text("".join(json.dumps({"id": str(i), "text": d}) + "\n" for i, d in enumerate(DOCUMENTS)))
    return path, model.eval(), tokenizer, text


def reference_bpb(model, tokenizer, documents, window: int) -> tuple[float, float]:
    """(bits per byte, nats per scored token): the documents as one BOS-separated stream read in
    windows of `window` tokens, each window alone, its positions scored one by one; BOS targets
    are not scored; bytes are the documents' own UTF-8 bytes."""
    stream = [t for d in documents for t in [tokenizer.bos_id, *tokenizer.encode(d)]]
    nats, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, window):
            ids = stream[start:start + window + 1]
            logits = model(torch.tensor([ids[:-1]]))[0]
            for t in range(1, len(ids)):
                if ids[t] != tokenizer.bos_id:
                    nats -= F.log_softmax(logits[t - 1].double(), -1)[ids[t]].item()
                    scored += 1
    return nats / math.log(2) / sum(len(d.encode("utf-8")) for d in documents), nats / scored


def rows_of(out: Path) -> list[dict]:
    return json.loads((out / "perplexity.json").read_text())["rows"]


@pytest.mark.parametrize("seq_len", [64, 8])
def test_bits_per_byte_matches_a_plain_loop_over_the_windows(saved, tmp_path, seq_len):
    """64: the whole stream in one window; 8: windows across document boundaries, two per forward
    pass, the last one shorter."""
    path, model, tokenizer, text = saved
    perplexity.main([str(path), "--text", str(text), "--seq-len", str(seq_len), "--batch", "2", "--out",
                     str(tmp_path)])
    [row] = rows_of(tmp_path)
    assert row["checkpoint"] == "ppl/pretrain/step_000001" and row["pattern"] == "AM"
    assert row["bytes"] == sum(len(d.encode("utf-8")) for d in DOCUMENTS)
    bpb, nats_per_token = reference_bpb(model, tokenizer, DOCUMENTS, seq_len)
    assert row["bpb"] == pytest.approx(bpb, abs=1e-4)
    assert row["token_ppl"] == pytest.approx(math.exp(nats_per_token), rel=1e-3)
    assert row["tokens"] == sum(len(tokenizer.encode(d)) for d in DOCUMENTS)
    assert (tmp_path / "perplexity.png").stat().st_size > 0


def test_max_tokens_scores_the_start_of_the_stream(saved, tmp_path):
    path, model, tokenizer, text = saved
    perplexity.main([str(path.parent), "--text", str(text), "--max-tokens", "10", "--out", str(tmp_path)])
    [row] = rows_of(tmp_path)  # the stage folder: its latest step
    first = tokenizer.encode(DOCUMENTS[0])
    assert len(first) > 10 and row["tokens"] == 10
    assert row["bytes"] == len(tokenizer.decode(first[:10]).encode("utf-8"))


def test_named_sets_and_text_files_read_as_documents(tmp_path):
    prose = perplexity.read_documents("heldout_prose")
    assert len(prose) == 60 and all(len(d.split()) >= 40 for d in prose)
    docs = perplexity.read_documents("python_docs")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    plain = tmp_path / "notes.txt"
    plain.write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert perplexity.read_documents(str(plain)) == ["first paragraph\nstill first", "second"]


def test_bad_input_ends_with_one_error_line(saved, tmp_path):
    path, _, _, _ = saved
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: no field data.text_key='text'"):
        perplexity.read_documents(str(bad))
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')  # read as data=text reads it: not a traceback
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field data.text_key='text' must be a string"):
        perplexity.read_documents(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty.txt: no text to score"):
        perplexity.main([str(path), "--text", str(empty), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="--seq-len=0 must be >= 1"):
        perplexity.main([str(path), "--seq-len", "0"])
    result = subprocess.run([sys.executable, "-m", "hybridchat.bench", "perplexity", str(path), "--text",
                             str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --text {tmp_path / 'missing.txt'}: no such file (give heldout_prose, python_docs or a "
        f".txt/.md/.jsonl/.parquet file)"]
    assert not (tmp_path / "out").exists()
