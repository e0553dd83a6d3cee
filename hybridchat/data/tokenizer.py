"""Byte-level BPE tokenizer (HF `tokenizers`), trained on the run's corpus and cached by its hash.

The special tokens every later stage needs are reserved now, so a checkpoint from pretraining keeps
its vocabulary through mid-training, RAG and REFRAG.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from hybridchat.core.errors import UserError
from hybridchat.core.fsutil import atomic_write_text

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|documents_start|>", "<|documents_end|>",
    "<|document_start|>", "<|document_end|>",
    "<|query_start|>", "<|query_end|>",
    "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>",
]
# GPT-4-style pre-split (letters, up to 3 digits, punctuation, whitespace), then bytes.
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                 r"|\s*[\r\n]|\s+(?!\S)|\s+")
FORMAT_VERSION = 1


# The document separator: ours, else the one GPT-2-style vocabularies (SmolLM2, imported) use.
BOS_TOKENS = ("<|bos|>", "<|endoftext|>")


class Tokenizer:
    """Wraps any byte-level HF tokenizer: ours (SPECIAL_TOKENS) or an imported model's (ChatML)."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        # Text that merely contains "<|bos|>" (a web page, a retrieved document) must not turn into
        # the control token: special tokens come only from the chat renderer, by id.
        self.hf.encode_special_tokens = True
        # Stored in checkpoints: the exact vocabulary in use (a hash of the whole tokenizer file).
        self.fingerprint = hashlib.sha256(hf.to_str().encode()).hexdigest()[:16]
        self.special_tokens = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        bos = [t for t in BOS_TOKENS if t in self.special_tokens]
        if not bos:
            raise UserError(f"the tokenizer has none of the document separators {list(BOS_TOKENS)} among its "
                            f"special tokens")
        self.bos_id = self.token_id(bos[0])

    def has_token(self, token: str) -> bool:
        return self.hf.token_to_id(token) is not None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_id(self, token: str) -> int:
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte.

        In the byte-level alphabet every character of a token string is exactly one byte."""
        counts = [0 if (tok := self.hf.id_to_token(i)) in self.special_tokens else len(tok)
                  for i in range(self.vocab_size)]
        return torch.tensor(counts, dtype=torch.int32)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise UserError(f"tokenizer file {path} cannot be read ({e}); delete it to retrain") from e
        return cls(hf)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.hf.to_str())



def load_or_train(texts: Iterable[str], vocab_size: int, max_chars: int, cache_dir: str | Path) -> Tokenizer:
    """Take up to max_chars of texts; reuse the cached tokenizer trained on exactly that sample."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"data.tokenizer_vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    sample, n = [], 0
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, vocab_size, SPECIAL_TOKENS, SPLIT_PATTERN]).encode())
    for text in texts:
        text = text[: max_chars - n]
        sample.append(text)
        digest.update(text.encode())
        n += len(text)
        if n >= max_chars:
            break
    if not sample:
        raise UserError("no text to train the tokenizer on: the data source yielded no documents")
    path = Path(cache_dir) / "tokenizers" / f"{digest.hexdigest()[:16]}.json"
    if path.exists():
        return Tokenizer.load(path)
    tok = Tokenizer.train(sample, vocab_size)
    tok.save(path)
    return tok
