"""The sparse retrievers' analyzer: lowercase words, English stopwords removed, Snowball stems.

Shared by TF-IDF, bm25s and rank-bm25 so all three see the same terms.
"""

from __future__ import annotations

import re
from functools import lru_cache

import Stemmer
from bm25s.stopwords import STOPWORDS_EN

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's and bm25s's default token pattern
_STOP = frozenset(STOPWORDS_EN)


@lru_cache(maxsize=1)
def _stemmer() -> Stemmer.Stemmer:
    return Stemmer.Stemmer("english")


def analyze(texts: list[str]) -> list[list[str]]:
    stem = _stemmer().stemWords  # C implementation; one call per text, not per word
    return [stem([w for w in _TOKEN.findall(t.lower()) if w not in _STOP]) for t in texts]


def document_text(title: str, text: str) -> str:
    """What gets indexed for a document: the title carries entity names, so it is included."""
    return f"{title}\n{text}" if title else text
