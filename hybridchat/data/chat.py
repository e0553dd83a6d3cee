"""Chat rendering: conversations (and the documents a turn reads) -> token ids + loss mask.

Two formats, chosen by the tokenizer's vocabulary. Ours (models trained here) uses the reserved
special tokens:

    <|bos|> <|user_start|>question<|user_end|>
    [<|documents_start|> <|document_start|>[1] title (id)\ntext<|document_end|> ... <|documents_end|>]
    <|assistant_start|>reply<|assistant_end|> ...

An imported model keeps the format it was trained with (ChatML for SmolLM2); it has no document
tokens, so the documents are text at the end of the user message:

    <|im_start|>user\nquestion\n\nDocuments:\n[1] title (id)\ntext\n\n...<|im_end|>\n
    <|im_start|>assistant\nreply<|im_end|>\n

Special tokens come only from here, by id: text that contains "<|user_start|>" stays text. The mask
is 1 on the tokens the model must learn to write (assistant replies and their end token) and 0 on
everything it is given (the user, the documents, the assistant header). A user message may carry
"documents" (a list of Document): they are rendered right after that turn's text, numbered from 1,
which is what a reply's citation [n] refers to. After, not before: retrieval follows the question,
and a Mamba layer can only keep what a question it has already read makes relevant (attention can
look back either way). A system message is a turn of its own in ChatML; ours has no system token,
so there it is folded into the next user message.

Multi-hop (refrag): an assistant message may carry "hops", a list of {"query", "documents"}: before
its reply the model writes each follow-up query and is shown what retrieval found for it, numbered
on from the documents before (so a citation [n] counts across all documents shown):

    <|assistant_start|><|query_start|>Kor Industries<|query_end|>
    <|documents_start|><|document_start|>[3] Kor Industries (company-0007)\n...<|document_end|><|documents_end|>
    [3] Tam Brel<|assistant_end|>

The query and its markers are learned (the model must write them for the engine's query hook to
fire); the retrieved section is given. ChatML has no query tokens: the query is a line of plain text
"Search: Kor Industries\n" and the results follow as "Documents:" and the documents, then a blank
line before the reply. Both markers are ordinary text there, so parsing them reads decoded text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import count
from typing import Callable, Iterator, Sequence

import torch

from hybridchat.core.documents import Document
from hybridchat.core.seeds import DATA_ORDER, python_rng
from hybridchat.data.loader import Batch
from hybridchat.data.tokenizer import SPECIAL_TOKENS, Tokenizer

Example = tuple[list[int], list[int]]  # token ids, loss mask (1 = learn to write this token)
Ids = tuple[int, ...]


@dataclass(frozen=True)
class ChatFormat:
    """The token sequences around each part of a conversation."""
    begin: Ids                     # once, before the first turn
    user: tuple[Ids, Ids]          # around the user's text
    assistant: tuple[Ids, Ids]     # header (given) and end (learned: it is how the model stops)
    after_assistant: Ids           # given, between an assistant turn and the next
    documents: tuple[Ids, Ids]     # around the documents section
    document: tuple[Ids, Ids]      # around each document
    documents_in_user_turn: bool   # documents before the user's end tokens (text formats)
    query: tuple[Ids, Ids]         # around a follow-up query the model writes (learned)
    results: tuple[Ids, Ids]       # around the documents retrieved for it, inside the reply (given)
    system: tuple[Ids, Ids] | None = None  # around a system message; None: folded into the next user turn
    # (starts, ends): the tokens that open and close a request (a user message, a follow-up query), one
    # token each and used for nothing else, what the model's request match reads (model/request_match.py).
    # None: the format has no such tokens (ChatML opens every turn with one token, its queries are text).
    request_markers: tuple[Ids, Ids] | None = None

    @property
    def stop_token(self) -> int:
        return self.assistant[1][-1]

    @classmethod
    def ours(cls, t: Callable[[str], int] = SPECIAL_TOKENS.index) -> "ChatFormat":
        """Ours, every part marked by a special token; t gives a token's id. The default is the id every
        tokenizer trained here has (the special tokens come first, in order): ours without one at hand,
        for models run on token ids alone (benchmarks, tests)."""
        return cls(begin=(t("<|bos|>"),), user=((t("<|user_start|>"),), (t("<|user_end|>"),)),
                   assistant=((t("<|assistant_start|>"),), (t("<|assistant_end|>"),)), after_assistant=(),
                   documents=((t("<|documents_start|>"),), (t("<|documents_end|>"),)),
                   document=((t("<|document_start|>"),), (t("<|document_end|>"),)), documents_in_user_turn=False,
                   query=((t("<|query_start|>"),), (t("<|query_end|>"),)),
                   results=((t("<|documents_start|>"),), (t("<|documents_end|>"),)),
                   request_markers=((t("<|user_start|>"), t("<|query_start|>")),
                                    (t("<|user_end|>"), t("<|query_end|>"))))

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> "ChatFormat":
        if tok.has_token("<|user_start|>"):
            return cls.ours(tok.token_id)
        if tok.has_token("<|im_start|>"):
            start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")

            def text(s: str) -> Ids:
                return tuple(tok.encode(s))

            return cls(begin=(), user=((start, *text("user\n")), (end, *text("\n"))),
                       assistant=((start, *text("assistant\n")), (end,)), after_assistant=text("\n"),
                       documents=(text("\n\nDocuments:"), ()), document=(text("\n\n"), ()),
                       documents_in_user_turn=True, system=((start, *text("system\n")), (end, *text("\n"))),
                       query=(text("Search: "), text("\n")), results=(text("Documents:"), text("\n\n")))
        raise ValueError("the tokenizer has neither hybridchat's chat tokens (<|user_start|>) nor ChatML's "
                         "(<|im_start|>)")


class ChatRenderer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.format = ChatFormat.for_tokenizer(tokenizer)
        # Documents recur across examples (the same few thousand in every epoch): encode each once.
        self._document_tokens = lru_cache(maxsize=65536)(self._encode_document)

    @property
    def stop_token(self) -> int:
        return self.format.stop_token

    @property
    def pad_id(self) -> int:  # any id works: padding is never a target
        return self.tokenizer.bos_id

    def _encode_document(self, index: int, doc_id: str, title: str, text: str) -> Ids:
        start, end = self.format.document
        return (*start, *self.tokenizer.encode(f"[{index}] {title} ({doc_id})\n{text}"), *end)

    def documents_section(self, documents: Sequence[Document], first: int = 1, wrap: tuple[Ids, Ids] | None = None
                          ) -> list[int]:
        """The documents numbered from `first`, inside `wrap` (default: the user turn's section)."""
        start, end = wrap or self.format.documents
        ids = list(start)
        for i, d in enumerate(documents, first):
            ids += self._document_tokens(i, d.id, d.title, d.text)
        return ids + list(end)

    def query(self, text: str) -> list[int]:
        """A follow-up query as the model writes it, markers included."""
        start, end = self.format.query
        return [*start, *self.tokenizer.encode(text), *end]

    def results(self, documents: Sequence[Document], first: int) -> list[int]:
        """What retrieval found for a query, as injected into the reply; empty documents still make a
        (closed) section, so the model reads that nothing came back and goes on to answer."""
        return self.documents_section(documents, first, self.format.results)

    @property
    def query_markers(self) -> tuple[str, str]:
        """The query's start and end markers as decoded text (generation is parsed as text)."""
        return tuple(self.tokenizer.decode(ids) for ids in self.format.query)

    def render(self, messages: Sequence[dict]) -> Example:
        """A whole conversation for training: (ids, mask)."""
        f = self.format
        ids, mask = list(f.begin), [0] * len(f.begin)

        def add(tokens: Sequence[int], learn: bool) -> None:
            ids.extend(tokens)
            mask.extend([int(learn)] * len(tokens))

        shown = 0  # documents of the latest section, and of replies since: retrieved ones number on from them
        for role, content, documents, hops in _turns(messages, fold_system=f.system is None):
            if role == "system":
                add([*f.system[0], *self.tokenizer.encode(content), *f.system[1]], False)
            elif role == "user":
                section = self.documents_section(documents) if documents is not None else []
                shown = len(documents) if documents is not None else shown
                inside, outside = (section, []) if f.documents_in_user_turn else ([], section)
                add([*f.user[0], *self.tokenizer.encode(content), *inside, *f.user[1], *outside], False)
            else:
                add(f.assistant[0], False)
                for hop in hops:
                    query = self.query(hop["query"])
                    # learn_opening=False: what follows a query's opening marker is taught, not opening
                    # it (refrag's needless queries: how to go on after one, not to write one)
                    opening = len(f.query[0])
                    add(query[:opening], hop.get("learn_opening", True))
                    add(query[opening:], True)
                    add(self.results(hop["documents"], shown + 1), False)
                    shown += len(hop["documents"])
                add([*self.tokenizer.encode(content), *f.assistant[1]], True)
                add(f.after_assistant, False)
        return ids, mask

    def prompt(self, messages: Sequence[dict]) -> list[int]:
        """Tokens up to and including the assistant header of the reply to the last (user) message."""
        if not messages or messages[-1]["role"] not in ("user", "system"):
            raise ValueError("a prompt ends with a user message")
        ids, _ = self.render(messages)
        return ids + list(self.format.assistant[0])


def _turns(messages: Sequence[dict], fold_system: bool
           ) -> Iterator[tuple[str, str, Sequence[Document] | None, Sequence[dict]]]:
    system = ""
    for m in messages:
        if m["role"] == "system" and fold_system:
            system = m["content"]
            continue
        content = f"{system}\n\n{m['content']}" if system and m["role"] == "user" else m["content"]
        system = ""
        yield m["role"], content, m.get("documents"), m.get("hops", ())


def padded_width(longest: int, width_limit: int | None) -> int:
    """The batch width for rows of at most `longest` tokens. With a limit (runs under torch.compile,
    where every new batch shape is a new compile of the model: the SSD scan's loop over chunks is
    unrolled) the next power of two, at most width_limit: a handful of shapes in a run, at most twice
    the tokens. Without one, exactly `longest`."""
    if width_limit is None:
        return longest
    return max(longest, min(1 << (longest - 1).bit_length(), width_limit))


def collate(examples: Sequence[Example], pad_id: int, width_limit: int | None = None) -> Batch:
    """Right-padded rows: inputs = ids[:-1], targets = ids[1:] where the mask says learn, else -1.
    Right padding is safe for attention and Mamba alike: padding only ever follows real tokens.
    width_limit: pad to padded_width's few shapes (see there)."""
    width = padded_width(max(len(ids) for ids, _ in examples) - 1, width_limit)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return {"inputs": inputs, "targets": targets}


def example_batches(n_items: int, make: Callable[[int, int], Example], batch_size: int, seed: int, pad_id: int,
                    start: int = 0, rank: int = 0, world_size: int = 1, width_limit: int | None = None,
                    length_grouping: int = 1) -> Iterator[Batch]:
    """Endless batches of make(item, epoch) over a fresh shuffle of the items every epoch. Batches are
    numbered globally (rank r takes r, r + world_size, ...) and derived from (seed, epoch) alone, so
    resuming at batch `start` needs no replay.

    length_grouping > 1: every `length_grouping` consecutive batches of an epoch are made as one pool,
    sorted by length and cut into batches that come in a shuffled order. A batch is as wide as its
    longest row, so rows of similar length waste less compute on padding (a third of rag's batch was
    padding); an epoch still shows every item once, only who shares a batch changes."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_items} examples do not fill one batch of {batch_size}")
    group = max(1, length_grouping)
    order_epoch, order = -1, list(range(n_items))
    pool_key, pool, pool_batches = None, [], []
    for index in count(start):
        if index % world_size != rank:
            continue
        epoch, offset = divmod(index, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, list(range(n_items))
            python_rng(seed, DATA_ORDER, "epoch", epoch).shuffle(order)
        first = offset - offset % group
        if pool_key != (epoch, first):
            last = min(first + group, per_epoch)
            pool_key, pool = (epoch, first), [make(i, epoch) for i in order[first * batch_size:last * batch_size]]
            if group == 1:
                pool_batches = [list(range(len(pool)))]
            else:
                by_length = sorted(range(len(pool)), key=lambda j: len(pool[j][0]))
                pool_batches = [by_length[b * batch_size:(b + 1) * batch_size] for b in range(last - first)]
                python_rng(seed, DATA_ORDER, "pool", epoch, first).shuffle(pool_batches)
        yield collate([pool[j] for j in pool_batches[offset - first]], pad_id, width_limit)
