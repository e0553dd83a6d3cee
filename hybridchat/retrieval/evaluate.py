"""Retrieval quality against gold document ids: recall@k, MRR@10, and for two-gold (two-hop)
questions the share with both gold documents in the top k.

Hits are chunks; they are mapped to their parent document ids (first occurrence kept), so a
document split into several chunks counts once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hybridchat.core.errors import UserError
from hybridchat.retrieval.base import Retriever

KS = (1, 3, 10)
CHUNKS_PER_DOC = 5  # search this many chunks per wanted document, since chunks of one document collapse


@dataclass(frozen=True)
class GoldQuestion:
    question: str
    answers: list[str]
    gold_doc_ids: list[str]


def read_questions(path: str | Path, require_gold: bool = True) -> list[GoldQuestion]:
    """Questions JSONL: one object per line with 'question', 'gold_doc_ids' and optional 'answers'.
    require_gold=False (answer evaluation): 'gold_doc_ids' may be empty or left out, as for an
    unanswerable question (empty 'answers'). Every problem is a UserError naming the file (and line)."""
    out = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                out.extend(_question(path, lineno, raw, require_gold))
    except OSError as e:
        raise UserError(f"--questions {path}: cannot be read ({e.strerror or e}); give a JSONL file with "
                        f"question, answers, gold_doc_ids") from None
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def _question(path, lineno: int, raw: bytes, require_gold: bool = True) -> list[GoldQuestion]:
    """The question on one line ([] for a blank line)."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
    if not line.strip():
        return []
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # integers too long to convert, nesting too deep
        raise UserError(f"{path}:{lineno}: invalid JSON ({type(e).__name__}: {' '.join(str(e).split())})") from None
    q, gold, answers = ((obj.get("question"), obj.get("gold_doc_ids"), obj.get("answers")) if isinstance(obj, dict)
                        else (None, None, None))
    if not isinstance(q, str) or not q.strip():
        raise UserError(f"{path}:{lineno}: needs a non-empty 'question' string")
    if gold is None and not require_gold:
        gold = []
    if not isinstance(gold, list) or (require_gold and not gold) or not all(isinstance(g, str) for g in gold):
        raise UserError(f"{path}:{lineno}: needs 'gold_doc_ids', a {'non-empty ' if require_gold else ''}list of "
                        f"document ids")
    if answers is None:
        answers = []
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                for a in answers):
        raise UserError(f"{path}:{lineno}: 'answers' must be a list of strings (or left out)")
    return [GoldQuestion(q, [str(a) for a in answers], gold)]


def ranked_parents(hits, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(h.document.parent_id, None)
    return list(seen)[:n]


def evaluate(retriever: Retriever, questions: Sequence[GoldQuestion], ks: Sequence[int] = KS) -> dict:
    depth = max(ks)
    results = retriever.search([q.question for q in questions], top_k=depth * CHUNKS_PER_DOC)
    recall = {k: 0.0 for k in ks}
    both = {k: 0 for k in ks if k > 1}
    mrr, two_gold = 0.0, 0
    for q, hits in zip(questions, results):
        ranked = ranked_parents(hits, depth)
        gold = set(q.gold_doc_ids)
        for k in ks:
            recall[k] += len(gold & set(ranked[:k])) / len(gold)
        mrr += next((1 / r for r, d in enumerate(ranked, 1) if d in gold), 0.0)
        if len(gold) == 2:
            two_gold += 1
            for k in both:
                both[k] += gold <= set(ranked[:k])
    n = len(questions)
    report = {"questions": n, **{f"recall@{k}": recall[k] / n for k in ks}, f"mrr@{depth}": mrr / n,
              "two_gold_questions": two_gold}
    if two_gold:
        report.update({f"both@{k}": both[k] / two_gold for k in both})
    return report
