"""A reply's text as its tokens are sampled, in pieces that join up to the finished reply.

Tokens are byte-level BPE pieces: one token may end inside a character, and a word may span
tokens, so the whole reply so far is decoded each time and only its new end is handed out. A piece
is held back while the finished reply may still differ from it: a trailing partial character
(decoded as U+FFFD), trailing whitespace (Answerer strips the reply) and, with hold_abstention, a
reply that so far reads as the abstention (an abstention threshold may replace it by another reply,
rag/abstention.py). So the pieces handed out, then finish()'s rest, are exactly Answer.reply.
"""

from __future__ import annotations

import re

from hybridchat.rag.answer import ABSTAIN

# Citations before the answer, the last one perhaps still being written ("[1] [2", "[").
_LEADING_CITATIONS = re.compile(r"^(?:\s*\[\d*\]?)*\s*")


class ReplyStream:
    def __init__(self, tokenizer, hold_abstention: bool = False):
        self.tokenizer, self.hold_abstention = tokenizer, hold_abstention
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        """The text to hand out now that `token` was sampled ("" while held back)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens).lstrip().rstrip(" \t\r\n\ufffd")
        if self.hold_abstention and ABSTAIN.startswith(" ".join(_LEADING_CITATIONS.sub("", text).split())):
            return ""
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece

    def finish(self, reply: str) -> str:
        """The rest of the finished reply after what was handed out; "" where the reply does not
        continue it (a reply replaced after it was streamed, without hold_abstention)."""
        return reply[len(self.sent):] if reply.startswith(self.sent) else ""

    def replaced(self, reply: str) -> bool:
        """Whether what was handed out is not the start of the finished reply."""
        return not reply.startswith(self.sent)
