"""Retrieval quality against gold document ids: recall@k, MRR@10, and for two-gold (two-hop)
questions the share with both gold documents in the top k.

Hits are chunks; they are mapped to their parent document ids (first occurrence kept), so a
document split into several chunks counts once. Questions without gold documents (unanswerable
ones) have nothing to recall: they are left out of every rate and counted as `without_gold`.
"""

from __future__ import annotations

from typing import Sequence

from hybridchat.core.errors import UserError
from hybridchat.core.questions import Question
from hybridchat.retrieval.base import Retriever

KS = (1, 3, 10)
CHUNKS_PER_DOC = 5  # search this many chunks per wanted document, since chunks of one document collapse


def ranked_parents(hits, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for h in hits:
        seen.setdefault(h.document.parent_id, None)
    return list(seen)[:n]


def evaluate(retriever: Retriever, questions: Sequence[Question], ks: Sequence[int] = KS) -> dict:
    scored = [q for q in questions if q.gold_doc_ids]
    if not scored:
        raise UserError("no question has gold_doc_ids: nothing to measure retrieval against")
    depth = max(ks)
    results = retriever.search([q.question for q in scored], top_k=depth * CHUNKS_PER_DOC)
    recall = {k: 0.0 for k in ks}
    both = {k: 0 for k in ks if k > 1}
    mrr, two_gold = 0.0, 0
    for q, hits in zip(scored, results):
        ranked = ranked_parents(hits, depth)
        gold = set(q.gold_doc_ids)
        for k in ks:
            recall[k] += len(gold & set(ranked[:k])) / len(gold)
        mrr += next((1 / r for r, d in enumerate(ranked, 1) if d in gold), 0.0)
        if len(gold) == 2:
            two_gold += 1
            for k in both:
                both[k] += gold <= set(ranked[:k])
    n, without_gold = len(scored), len(questions) - len(scored)
    report = {"questions": n, **({"without_gold": without_gold} if without_gold else {}),
              **{f"recall@{k}": recall[k] / n for k in ks}, f"mrr@{depth}": mrr / n, "two_gold_questions": two_gold}
    if two_gold:
        report.update({f"both@{k}": both[k] / two_gold for k in both})
    return report
