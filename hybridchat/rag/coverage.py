"""Retrieval evidence for the answer-or-abstain decision: how much of a question the documents shown say.

A model's own confidence (1 - P(ABSTAIN), rag/answer.py) learned on one corpus transfers poorly to
another: on real documents it never saw, a RAG-tuned model answered questions about names that exist
nowhere at high confidence. What the documents shown contain is a signal that does not depend on the
model: a question whose rare words (a name, a term) appear in none of them is rarely answered there.
The coverage of a question is the share of its terms (the sparse retrievers' analyzer: stopwords
removed, stems) found in the documents shown, each term weighted by its inverse document frequency
in the knowledge base, so a missing name counts for more than a missing "year". A term the knowledge
base never holds weighs the most. Question words ("which", "who") are what a question asks, not what
it is about, and rarely in a document: they are not looked for.

The decision combines them as confidence x coverage ** exponent, the exponent chosen with the
threshold on validation questions (rag/abstention.py: 0 leaves the model's confidence alone).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

from hybridchat.core.documents import Document
from hybridchat.retrieval.text import analyze, document_text

# Not stopwords to the retrievers (bm25s's list keeps them), but never what a question is about.
QUESTION_WORDS = frozenset(analyze(["what which who whom whose where when why how"])[0])


class Coverage:
    """coverage(question, documents) in [0, 1], with term weights from a knowledge base's documents."""

    def __init__(self, document_frequency: dict[str, int], n_documents: int):
        self.document_frequency, self.n_documents = document_frequency, n_documents

    @classmethod
    def of(cls, documents: Sequence[Document]) -> "Coverage":
        """Weights from these documents (a knowledge base's: how rare each term is there)."""
        frequency: Counter[str] = Counter()
        for terms in analyze([document_text(d.title, d.text) for d in documents]):
            frequency.update(set(terms))
        return cls(dict(frequency), len(documents))

    def weight(self, term: str) -> float:
        """Smoothed inverse document frequency: 1 for a term in every document, the most for one in none."""
        return math.log((self.n_documents + 1) / (self.document_frequency.get(term, 0) + 1)) + 1

    def __call__(self, question: str, documents: Iterable[Document]) -> float:
        """The weighted share of the question's terms the documents hold; 1 for a question without
        terms (all stopwords: nothing to look for)."""
        wanted = set(analyze([question])[0]) - QUESTION_WORDS
        if not wanted:
            return 1.0
        found = {t for terms in analyze([document_text(d.title, d.text) for d in documents]) for t in terms}
        total = sum(self.weight(t) for t in wanted)
        return sum(self.weight(t) for t in wanted & found) / total


def evidence(confidence: float, coverage: float, exponent: float) -> float:
    """The decision's score: the model's confidence x coverage ** exponent (exponent 0: the confidence)."""
    return confidence * coverage ** exponent if exponent else confidence
