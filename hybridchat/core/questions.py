"""The question record every user of questions shares: the synthetic world makes them, a questions
JSONL file holds a user's, and the rag and refrag stages, the evaluator and `kb eval` ask them.

A question carries what scores an answer to it (hybridchat.rag.answer.score: the accepted answers,
none when no document holds one; the gold documents, for citations and retrieval recall) and,
once retrieved, the documents a retriever found for it. A neutral module, like documents.py:
`data/` and `retrieval/` both use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.jsonl import json_lines


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...] = ()  # accepted answer strings, the first canonical; empty: unanswerable
    gold_doc_ids: tuple[str, ...] = ()  # documents that hold the answer (2-hop: in hop order); may be empty
    candidates: tuple[Document, ...] = ()  # what a retriever found for it, best first
    id: str = ""  # the world's "person-0012/birth_city"; "file:line" for a question read from a file
    hops: Optional[int] = None  # the world's: documents read in turn to answer (1 or 2); unknown for a user's
    split: str = ""  # the world's: "train", "heldout" or "unanswerable"

    def with_candidates(self, documents: Iterable[Document]) -> Question:
        return replace(self, candidates=tuple(documents))

    def to_json(self) -> dict:
        """One line of a questions file (read_questions reads question, answers and gold_doc_ids back)."""
        return {"id": self.id, "question": self.question, "answers": list(self.answers),
                "gold_doc_ids": list(self.gold_doc_ids), "hops": self.hops, "split": self.split}


def read_questions(path: str | Path) -> list[Question]:
    """A questions JSONL file: one object per line with a non-empty 'question' string, 'answers' (a
    list of strings or numbers; empty or left out: unanswerable) and 'gold_doc_ids' (a list of
    document ids; may be empty or left out), optionally 'id' (a string; default "file:line") and 'hops'
    (the documents read in turn to answer: an integer >= 1; default unknown), as Question.to_json and
    `python -m hybridchat.qa` write them. Other keys are ignored. Every problem is one UserError
    naming the file, the line and the key."""
    try:
        with open(path, "rb") as f:
            out = [_question(where, obj) for where, obj in json_lines(f, path)]
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}); give a JSONL file with "
                        f"question, answers, gold_doc_ids") from None
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def _question(where: str, obj) -> Question:
    """The question of one line."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with 'question', 'answers' and 'gold_doc_ids'")
    q = obj.get("question")
    # null is as good as left out
    gold = [] if obj.get("gold_doc_ids") is None else obj["gold_doc_ids"]
    answers = [] if obj.get("answers") is None else obj["answers"]
    if not isinstance(q, str) or not q.strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
        raise UserError(f"{where}: 'gold_doc_ids' must be a list of document ids (or left out)")
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                for a in answers):
        raise UserError(f"{where}: 'answers' must be a list of strings (or left out)")
    qid, hops = obj.get("id"), obj.get("hops")
    if qid is not None and (not isinstance(qid, str) or not qid.strip()):
        raise UserError(f"{where}: 'id' must be a non-empty string (or left out)")
    if hops is not None and (not isinstance(hops, int) or isinstance(hops, bool) or hops < 1):
        raise UserError(f"{where}: 'hops' must be an integer >= 1 (or left out)")
    return Question(q, tuple(str(a) for a in answers), tuple(gold), id=qid or where, hops=hops)
