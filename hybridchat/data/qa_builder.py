"""Question sets from real documents: what a RAG reader trains and is evaluated on, from any corpus.

Every answer is a span of its gold document, found in the document's own sentences, so the
phrasings are the corpus's, not a handful of templates:
- cloze questions: a sentence with one span (a year, a count, a name) replaced by the wh-phrase
  that asks for it, the entity named where the sentence says "it";
- field questions: "Key: value" statements (a package's maintainer, an element's symbol);
- definition questions: what the first sentence of an entry says the entry is;
- 2-hop questions along a document's single cross-reference: a field of the document it links to,
  asked through the first ("who maintains the package that X depends on?");
- unanswerable questions: an answerable one with its entity replaced by a name that occurs nowhere
  in the corpus (checked word by word against it);
- gold-missing questions: about documents kept out of every knowledge base, kept only when no
  other document holds the answer.
Documents are split before any question is asked: held-out documents never appear in a training
question nor in the training knowledge base, so not even as distractors.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

from hybridchat.core.documents import Document
from hybridchat.data.corpora import Corpus

# A sentence ends at . ! or ? followed by a capital or an opening quote/bracket; "e.g. a" does not end one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\u201c])")
_NOT_PROSE = re.compile(r"[|\u2500-\u257f]|\+-{3}|={3}|::=")
_NOT_ASKABLE = re.compile(r"://|\[|\]|\.\.\.")  # addresses, editors' brackets, elisions: no clean span
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_YEAR = re.compile(r"(?<![\w./-])(1[0-9]{3}|20[0-9]{2})(?![\w/-])")
_COUNT = re.compile(r"(?<![\w.,-])(\d{1,3}(?:,\d{3})*|\d+)(?:\.\d+)?\s+([a-z]{3,}s)\b")
# Two to four capitalised words: a person, a company, a place; "de"/"von" may sit inside.
_NAME = re.compile(r"(?<![\w-])([A-Z][a-z]+(?:\s+(?:(?:de|von|van|of|la)\s+)?(?:[A-Z]\.\s+)?[A-Z][a-z]+){1,3})(?![\w-])")
_FIELD = re.compile(r"^([A-Z][A-Za-z ]{1,30}): (.+?)\.?$")
_PRONOUN_START = re.compile(r"^(It|This|They|He|She)\s+")
_DEFINITION_CUT = re.compile(r",|;|\.(?:\s|$)|\(| which | that | who | where | used | in order ")
_POS = re.compile(r"^(?:n|v|adj|adv|vt|vi|interj|prep|pron|abbrev)\.(?:,\s*(?:n|v|adj|adv|vt|vi)\.)*\s+")
_OR = re.compile(r'^\((?:Or|or|Also|also)\s[^)]*\)\s*')
_CAPITALISED_STARTS = {"The", "A", "An", "It", "This", "In", "On", "At", "For", "Its", "Some", "Most", "Many",
                       "When", "If", "As", "One", "Two", "There", "These", "Those", "Each", "All", "After", "Before"}
_INVERTIBLE = re.compile(r"^(?P<subject>[A-Z][^,;:?]*?) (?P<aux>is|are|was|were) (?P<rest>.+)$")
_AUX = re.compile(r"\b(?:is|are|was|were)\b")
_FRONTABLE = re.compile(r"\bby whom\b|\bin (?:what|which) year\b")
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)")
_FIELD_NOUNS = {"maintainer": "who", "homepage": "what", "section": "which", "version": "which", "source": "which"}

_PREFIXES = ("In {title}, {q}", "According to the entry on {title}, {q}", "About {title}: {q}",
             "{q} (This is about {title}.)", "Regarding {title}, {q}")
_DEFINITIONS = ("What is {title}?", "What does {title} mean?", "Define {title}.", "What is meant by {title}?",
                "{title}: what is it?", "Explain what {title} is.")
_FIELDS = ("What is the {key} of {title}?", "Which {key} does {title} have?", "{title}: what is its {key}?",
           "Tell me the {key} of {title}.", "What {key} is listed for {title}?")
_TWO_HOP = ("What is the {key} of the {noun} that {title} {verb}?",
            "{title} {verb} one {noun}. What is that {noun}'s {key}?",
            "Give the {key} of the {noun} {title} {verb}.")


@dataclass(frozen=True)
class QA:
    question: str
    answers: tuple[str, ...]     # empty: unanswerable
    gold_doc_ids: tuple[str, ...]
    kind: str                    # cloze, field, definition, two_hop, unanswerable, gold_missing
    id: str = ""
    withheld: tuple[str, ...] = ()  # gold_missing: the answers its kept-out document holds

    @property
    def hops(self) -> int:
        return len(self.gold_doc_ids) or 1

    def to_json(self, split: str) -> dict:
        return {"id": self.id, "question": self.question, "answers": list(self.answers),
                "gold_doc_ids": list(self.gold_doc_ids), "hops": self.hops, "split": split, "kind": self.kind,
                **({"withheld_answers": list(self.withheld)} if self.withheld else {})}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def shorten(document: Document, max_words: int) -> Document:
    """The document's leading sentences, at most max_words words (its first sentence at least),
    prose only: a reader's context holds a few of them."""
    kept, n = [], 0
    for s in sentences(document.text):
        if _NOT_PROSE.search(s):
            break
        words = len(s.split())
        if kept and n + words > max_words:
            break
        kept.append(s)
        n += words
    return Document(document.id, document.title, " ".join(kept), document.metadata, document.source)


def split_of(document_id: str, seed: int, test: float, missing: float) -> str:
    """train, test or missing: a hash of the document id, so a document's split does not depend on
    what else the corpus holds."""
    u = int.from_bytes(hashlib.sha256(f"{seed}/{document_id}".encode()).digest()[:8], "big") / 2 ** 64
    return "test" if u < test else "missing" if u < test + missing else "train"


def _with_entity(question: str, title: str, rng: random.Random) -> Optional[str]:
    """The question naming the document's entity: a leading pronoun becomes the title, else a
    phrase naming it is added. None when the sentence is about something else entirely."""
    m = _PRONOUN_START.match(question)
    if m:
        return title + " " + question[m.end():]
    if title.lower() in question.lower():
        return question
    first = question.split(" ", 1)[0]
    q = question[0].lower() + question[1:] if first in _CAPITALISED_STARTS else question
    return rng.choice(_PREFIXES).format(title=title, q=q)


def fronted(question: str) -> Optional[str]:
    """The question as people ask it, its wh-phrase first and the verb before the subject: "Pascal was
    designed by whom in 1970?" -> "By whom was Pascal designed in 1970?", "... in what year?" -> "In
    what year was ...?". None where it does not begin "<subject> is|are|was|were" (inverting any
    other verb needs its base form: "did ... design")."""
    m = _INVERTIBLE.match(question.rstrip("?"))
    if not m:
        return None
    phrase = _FRONTABLE.search(m.group("rest"))
    # A second verb before the phrase, or a long subject, may be a clause of its own ("the man who was
    # tall was seen by whom"): left as it is.
    if not phrase or _AUX.search(m.group("rest")[:phrase.start()]) or len(m.group("subject").split()) > 8:
        return None
    rest = " ".join((m.group("rest")[:phrase.start()] + m.group("rest")[phrase.end():]).split())
    subject = m.group("subject")
    if subject.split(" ", 1)[0] in _CAPITALISED_STARTS:
        subject = subject[0].lower() + subject[1:]
    return f"{phrase.group(0)[0].upper()}{phrase.group(0)[1:]} {m.group('aux')} {subject} {rest}".rstrip() + "?"


def _askable_clause(sentence: str) -> str:
    """The sentence without its parentheticals (asides, glosses: "(After C++)"), which questions do not
    repeat."""
    return " ".join(_PARENTHETICAL.sub("", sentence).split())


def cloze_questions(document: Document, rng: random.Random) -> list[QA]:
    """One candidate per sentence: a year, a count or a name in it asked for; the wh-phrase fronted
    (fronted) for half of those that allow it."""
    out = []
    for s in sentences(document.text):
        if _NOT_PROSE.search(s) or _NOT_ASKABLE.search(s) or not 6 <= len(s.split()) <= 45 or _FIELD.match(s):
            continue
        s = _askable_clause(s)
        spans = []
        for m in _YEAR.finditer(s):
            spans.append((m.start(1), m.end(1), rng.choice(("what year", "which year")), (m.group(1),)))
        for m in _COUNT.finditer(s):
            number = m.group(0).split()[0]
            # the number first: "how many hours" names the unit already ("14 hours" also right)
            spans.append((m.start(0), m.end(0), f"how many {m.group(2)}", (number, m.group(0))))
        for m in _NAME.finditer(s):
            if m.start() == 0 or m.group(1).lower() in document.title.lower():
                continue
            by = s[:m.start()].endswith("by ")
            spans.append((m.start(1) - (3 if by else 0), m.end(1), "by whom" if by else rng.choice(("what", "which name")),
                          (m.group(1),)))
        if not spans:
            continue
        start, end, wh, answers = rng.choice(spans)
        q = (s[:start] + wh + s[end:]).rstrip(" .!?;:") + "?"
        q = _with_entity(q, document.title, rng)
        if q and rng.random() < 0.5:
            q = fronted(q) or q
        # A parenthetical cut out can join a name's parts into one the document never writes.
        if q and not any(a.lower() in q.lower() for a in answers) and all(a in document.text for a in answers):
            out.append(QA(q, answers, (document.id,), "cloze"))
    return out


def field_values(document: Document) -> dict[str, str]:
    """"Key: value" statements of a document: key (lower case) -> value, values of ten words at most."""
    out = {}
    for s in sentences(document.text):
        m = _FIELD.match(s)
        if m and len(m.group(2).split()) <= 10 and not _NOT_ASKABLE.search(m.group(2)) and m.group(1).lower() not in out:
            out[m.group(1).lower()] = m.group(2).strip()
    return out


def _answer_forms(value: str) -> tuple[str, ...]:
    """A field's value and, for "Name <address>", the name alone (first: what a reader says)."""
    name = re.sub(r"\s*<[^>]*>\s*", " ", value).strip()
    return (name, value) if name and name != value else (value,)


def field_questions(document: Document, rng: random.Random) -> list[QA]:
    out = []
    for key, value in field_values(document).items():
        if key in ("depends", "description", "package", "pre-depends", "recommends"):
            continue  # lists and prose: not one short span
        q = rng.choice(_FIELDS).format(key=key, title=document.title)
        out.append(QA(q, _answer_forms(value), (document.id,), "field"))
    return out


def definition_question(document: Document, rng: random.Random) -> list[QA]:
    """What the first sentence says the entry is: "An attack in which ..." -> "An attack"."""
    first = (sentences(document.text) or [""])[0]
    first = _OR.sub("", _POS.sub("", first))
    head = re.match(rf"^{re.escape(document.title)}\s+(?:is|was|are)\s+(.*)$", first, re.I)
    body = head.group(1) if head else first
    if not re.match(r"^(?:a|an|the|any|one)\s", body, re.I) or _FIELD.match(first):
        return []
    answer = _DEFINITION_CUT.split(body, 1)[0].strip()
    if not 3 <= len(answer.split()) <= 10 or document.title.lower() in answer.lower():
        return []
    return [QA(rng.choice(_DEFINITIONS).format(title=document.title), (answer,), (document.id,), "definition")]


def two_hop_questions(document: Document, by_title: dict[str, Document], noun: str, verb: str,
                      rng: random.Random) -> list[QA]:
    """A field of the one document this one links to, asked through this one."""
    links = [t for t in dict.fromkeys(document.metadata.get("links", [])) if t in by_title and t != document.title]
    if len(links) != 1:
        return []  # several: "the package X depends on" would not say which
    target = by_title[links[0]]
    fields = [(k, v) for k, v in field_values(target).items() if k in _FIELD_NOUNS]
    if not fields:
        return []
    key, value = rng.choice(fields)
    q = rng.choice(_TWO_HOP).format(key=key, noun=noun, title=document.title, verb=verb)
    return [QA(q, _answer_forms(value), (document.id, target.id), "two_hop")]


class NameMaker:
    """Names that occur nowhere in a corpus: a title's words recombined with other titles' word
    halves until at least one word of the result is no word of the corpus."""

    def __init__(self, documents: Iterable[Document]):
        self.vocabulary: set[str] = set()
        pieces: set[str] = set()
        for d in documents:
            self.vocabulary.update(w.lower() for w in _WORD.findall(d.title + " " + d.text))
            pieces.update(w for w in _WORD.findall(d.title) if len(w) >= 4 and w.isalpha())
        self.pieces = sorted(pieces)

    def make(self, title: str, rng: random.Random) -> Optional[str]:
        words = title.split()
        candidates = [i for i, w in enumerate(words) if len(w) >= 3 and w.isalpha()]
        if not candidates or not self.pieces:
            return None
        for _ in range(20):
            i = rng.choice(candidates)
            word, other = words[i], rng.choice(self.pieces)
            new = word[:rng.randint(2, len(word) - 1)] + other[rng.randint(1, len(other) - 2):].lower()
            new = new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new.lower()
            if new.lower() not in self.vocabulary:
                return " ".join(words[:i] + [new] + words[i + 1:])
        return None


def unanswerable_from(qa: QA, title: str, names: NameMaker, rng: random.Random) -> Optional[QA]:
    """qa about a made-up entity instead of title's (None when the question does not name it)."""
    if title not in qa.question or qa.kind == "two_hop":
        return None
    fake = names.make(title, rng)
    return QA(qa.question.replace(title, fake), (), (), "unanswerable") if fake else None


KINDS = ("definition", "field", "cloze")


def document_questions(document: Document, by_title: dict[str, Document], noun: str, verb: str,
                       per_document: int, rng: random.Random, defines_title: bool = True,
                       kinds: tuple[str, ...] = KINDS) -> list[QA]:
    """Up to per_document single-hop questions about one document, taken from the kinds in turn
    (one of each in `kinds`' order, then again), and its 2-hop question when it has one.
    defines_title: the document is its title's only entry (not one paragraph of a page), so "what
    is <title>?" asks for its first sentence. At most one field question: a package's fields are
    many and alike, and a reader taught mostly to look up "Key: value" lines does not learn to read
    prose."""
    candidates = {"definition": definition_question(document, rng) if defines_title else [],
                  "field": field_questions(document, rng), "cloze": cloze_questions(document, rng)}
    for k in candidates.values():
        rng.shuffle(k)
    del candidates["field"][1:]
    queues = [candidates[k] for k in kinds]
    chosen: list[QA] = []
    while len(chosen) < per_document and any(queues):
        for k in queues:
            if k and len(chosen) < per_document:
                chosen.append(k.pop())
    return chosen + two_hop_questions(document, by_title, noun, verb, rng)


def holds_answer(qa: QA, documents_text: str) -> bool:
    return any(a.lower() in documents_text for a in qa.answers)


@dataclass
class QuestionSet:
    """Documents and questions by split. documents["train"] is the training knowledge base;
    train + test documents the evaluation one; "missing" documents are in neither (their questions
    are the gold-missing ones)."""
    documents: dict[str, list[Document]]
    questions: dict[str, list[QA]]


def _kept(documents: list[Document], max_documents: int, seed: int) -> list[Document]:
    """max_documents of them chosen by a hash of their id, in that order: the same document is
    chosen, and asked the same questions, whatever else the corpus holds and in whatever order."""
    key = lambda d: hashlib.sha256(f"{seed}/keep/{d.id}".encode()).digest()
    return sorted(documents, key=key)[:max_documents]


def build(corpora: Iterable[Corpus], *, max_documents: int = 2000, max_words: int = 120, per_document: int = 3,
          unanswerable: float = 0.3, test: float = 0.1, missing: float = 0.05, seed: int = 0,
          kinds: Iterable[str] = KINDS) -> QuestionSet:
    """A question set over the corpora (see the module docstring). unanswerable: made-up-entity
    questions per answerable question, in each split; test, missing: shares of documents; kinds: the
    single-hop kinds asked, in order of preference (document_questions)."""
    corpora, kinds = list(corpora), tuple(kinds)
    names = NameMaker(d for c in corpora for d in c.documents)
    documents = {"train": [], "test": [], "missing": []}
    answerable = {"train": [], "test": [], "missing": []}
    for corpus in corpora:
        split = {d.id: split_of(d.id, seed, test, missing) for d in corpus.documents}
        short = {d.id: shorten(d, max_words) for d in corpus.documents}
        short = {i: d for i, d in short.items() if len(d.text.split()) >= 5}
        ordered = sorted(short.values(), key=lambda d: d.id)  # a title several entries share: the same one each time
        by_title = {s: {d.title: d for d in ordered if split[d.id] == s} for s in documents}
        entries = Counter(d.title for d in corpus.documents)
        chosen: dict[str, Document] = {}
        for d in _kept(list(short.values()), max_documents, seed):
            chosen[d.id] = d
            asked = document_questions(d, by_title[split[d.id]], corpus.link_noun, corpus.link_verb, per_document,
                                       random.Random(f"{seed}/{d.id}"), defines_title=entries[d.title] == 1,
                                       kinds=kinds)
            for k, qa in enumerate(asked):
                answerable[split[d.id]].append(QA(qa.question, qa.answers, qa.gold_doc_ids, qa.kind, f"{d.id}/{k}"))
                for gold in qa.gold_doc_ids[1:]:
                    chosen[gold] = short[gold]  # a 2-hop question's second document joins the knowledge base
        for d in chosen.values():
            documents[split[d.id]].append(d)
    # Names differ in each split's made-up questions: no test name is seen in training.
    questions = {}
    for s in ("train", "test"):
        rng = random.Random(f"{seed}/unanswerable/{s}")
        titles = {d.id: d.title for d in documents[s]}
        pool = sorted((qa for qa in answerable[s] if qa.kind != "two_hop"), key=lambda qa: qa.id)
        rng.shuffle(pool)
        made_up = []
        for qa in pool:
            if len(made_up) >= round(len(answerable[s]) * unanswerable):
                break
            fake = unanswerable_from(qa, titles[qa.gold_doc_ids[0]], names, rng)
            if fake:
                made_up.append(QA(fake.question, (), (), fake.kind, f"{qa.id}/made-up"))
        questions[s] = answerable[s] + made_up
    # A gold-missing question stays only if nothing left in the knowledge bases holds its answer.
    searchable = "\n".join(f"{d.title}\n{d.text}".lower() for s in ("train", "test") for d in documents[s])
    questions["test"] += [QA(qa.question, (), (), "gold_missing", f"{qa.id}/gold-missing", qa.answers)
                          for qa in answerable["missing"] if qa.kind != "two_hop" and not holds_answer(qa, searchable)]
    return QuestionSet(documents, questions)
