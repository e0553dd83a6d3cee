"""Question sets from real text: the installed-source readers on small hand-made files, and the
builder's promises checked on a hand-made corpus (answers are spans of the gold document, made-up
names occur nowhere, held-out documents never reach training)."""

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.data import corpora, qa_builder
from hybridchat.data.corpora import Corpus

ROOT = Path(__file__).resolve().parent.parent


def b64(n: int) -> str:
    """dictd's base-64 numbers, written independently of the reader."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def write_dictd(directory: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """entries: (headwords, raw entry); several headwords share one entry, as in dictd files."""
    data, index = b"", []
    for headwords, raw in entries:
        body = raw.encode()
        for h in headwords:
            index.append(f"{h}\t{b64(len(data))}\t{b64(len(body))}")
        data += body
    index.insert(0, f"00-database-short\t{b64(0)}\t{b64(1)}")
    (directory / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")
    with gzip.open(directory / f"{name}.dict.dz", "wb") as f:
        f.write(data)


FOLDOC_ENTRY = ("Text To Speech\nTTS\n\n   <application> (TTS) Automatic conversion of text streams to\n"
                "   {voice} output, first sold by {Kurzweil Computer Products} in 1976.\n\n   [Details?]\n\n"
                "   (1997-05-11)\n\n")
JARGON_ENTRY = ("broken\n /broh'k@n/, adj.\n\n    1. Not working according to design (of programs). This is the\n"
                "    mainstream sense.\n\n")
ELEMENT_ENTRY = "argon\nSymbol: Ar\nAtomic number: 18\nMonatomic noble gas. Makes up 0.93% of the air.\n\n"


def test_dictd_entries_are_read_once_with_their_links_and_without_markup(tmp_path):
    write_dictd(tmp_path, "foldoc", [(["Text To Speech", "TTS"], FOLDOC_ENTRY), (["broken"], JARGON_ENTRY),
                                     (["argon"], ELEMENT_ENTRY)])
    corpus = corpora.read_dictd("foldoc", "dict-foldoc", tmp_path)
    by_title = {d.title: d for d in corpus.documents}
    assert sorted(by_title) == ["Text To Speech", "argon", "broken"]  # TTS shares the entry; 00-database skipped
    tts = by_title["Text To Speech"]
    assert tts.text == ("(TTS) Automatic conversion of text streams to voice output, first sold by "
                        "Kurzweil Computer Products in 1976.")
    assert tts.metadata["links"] == ["voice", "Kurzweil Computer Products"]
    assert by_title["broken"].text == "Not working according to design (of programs). This is the mainstream sense."
    assert by_title["argon"].text.startswith("Symbol: Ar. Atomic number: 18. Monatomic noble gas.")
    assert set(corpus.provenance["files"]) == {str(tmp_path / "foldoc.index"), str(tmp_path / "foldoc.dict.dz")}


def test_a_missing_dictionary_names_its_package(tmp_path):
    with pytest.raises(UserError, match="install the Debian package dict-jargon"):
        corpora.read_dictd("jargon", "dict-jargon", tmp_path)


def test_wordnet_text_is_never_read(tmp_path):
    write_dictd(tmp_path, "d", [(["tree"], "tree\n\n   A tall perennial woody plant [WordNet 1.5].\n\n")])
    assert corpora.read_dictd("d", "dict-d", tmp_path).documents == []


def test_a_package_stanza_becomes_a_document_linking_its_dependencies():
    stanza = ("Package: foo-utils\nVersion: 1.2-3\nMaintainer: Jane Roe <jane@example.org>\nSection: utils\n"
              "Depends: libfoo1 (>= 1.2), libc6 | libc6.1, python3:any\nDescription: tools for foo\n"
              " Longer text\n continued.\n\nPackage: libfoo1\nSection: libs\n")
    records = list(corpora._stanzas(stanza))
    assert [r["Package"] for r in records] == ["foo-utils", "libfoo1"]
    doc = corpora.package_document(records[0])
    assert doc.id == "debian:foo-utils" and doc.metadata["links"] == ["libfoo1", "libc6", "python3"]
    assert "Maintainer: Jane Roe <jane@example.org>." in doc.text
    assert qa_builder.field_values(doc)["maintainer"] == "Jane Roe <jane@example.org>"


def test_cloze_questions_ask_for_a_span_of_the_sentence_and_name_the_entity():
    doc = Document("d1", "Pascal", "It was designed by Niklaus Wirth in 1970. It is small.")
    seen = {(qa.question, qa.answers) for seed in range(200)
            for qa in qa_builder.cloze_questions(doc, random.Random(seed))}
    assert seen == {("Pascal was designed by whom in 1970?", ("Niklaus Wirth",)),
                    ("By whom was Pascal designed in 1970?", ("Niklaus Wirth",)),
                    ("Pascal was designed by Niklaus Wirth in what year?", ("1970",)),
                    ("In what year was Pascal designed by Niklaus Wirth?", ("1970",)),
                    ("Pascal was designed by Niklaus Wirth in which year?", ("1970",)),
                    ("In which year was Pascal designed by Niklaus Wirth?", ("1970",))}


@pytest.mark.parametrize("question, expected", [
    ("The lantern was cast by whom?", "By whom was the lantern cast?"),
    ("Pascal was released in which year after a long delay?", "In which year was Pascal released after a long delay?"),
    ("The council published a plan in what year?", None),       # no is/was to invert: "did ... publish"
    ("The man who was tall was seen by whom?", None),           # the first "was" is a clause of its own
    ("In May what year, the council met?", None),
])
def test_fronting_the_wh_phrase_by_hand(question, expected):
    assert qa_builder.fronted(question) == expected


def test_a_parenthetical_is_not_repeated_and_a_joined_name_is_not_asked():
    doc = Document("d", "Prolog++", "Prolog++ (after C++) was extended by Phil Vasey in 1989.")
    asked = {qa.question for seed in range(20) for qa in qa_builder.cloze_questions(doc, random.Random(seed))}
    assert asked and not any("after C++" in q for q in asked)
    joined = Document("d", "Foo", "Foo was written by Ada (born Byron) Lovelace in 1843.")
    answers = {qa.answers for seed in range(20) for qa in qa_builder.cloze_questions(joined, random.Random(seed))}
    assert ("Ada Lovelace",) not in answers and ("1843",) in answers


def test_counts_fields_and_definitions_by_hand():
    rng = random.Random(0)
    doc = Document("d", "wombat", "A burrowing marsupial native to Australia, with short legs. It sleeps about 14 hours a day.")
    (count,) = qa_builder.cloze_questions(doc, rng)
    # the reply is taught the bare number: the question names the unit ("14 hours" right as well)
    assert count.answers == ("14", "14 hours") and "how many hours" in count.question
    (definition,) = qa_builder.definition_question(doc, rng)
    assert definition.answers == ("A burrowing marsupial native to Australia",) and "wombat" in definition.question
    pkg = Document("p", "foo", "Package: foo. Maintainer: Jane Roe <jane@example.org>. Section: utils. Description: x")
    fields = {qa.answers for qa in qa_builder.field_questions(pkg, rng)}
    assert fields == {("Jane Roe", "Jane Roe <jane@example.org>"), ("utils",)}


def test_a_document_gets_at_most_one_field_question_and_the_rest_from_its_prose():
    pkg = Document("p", "foo", "Package: foo. Maintainer: Jane Roe <jane@example.org>. Section: utils. "
                   "Version: 1.2. Homepage: example.org. Foo was written by Ada Lovelace in 1843. "
                   "It was later ported to 12 platforms.")
    for seed in range(10):
        asked = qa_builder.document_questions(pkg, {}, "package", "depends on", 4, random.Random(seed))
        kinds = [qa.kind for qa in asked]
        # 4 fields and 2 prose sentences (one cloze question each) on offer: one field, both cloze
        assert sorted(kinds) == ["cloze", "cloze", "field"], kinds


def test_kinds_choose_which_questions_a_document_gets_and_in_what_order():
    doc = Document("p", "foo", "Foo is a tool for counting sheep. Maintainer: Jane Roe. "
                   "Foo was written by Ada Lovelace in 1843. It was later ported to 12 platforms.")
    for seed in range(10):
        def kinds(per_document, order):
            asked = qa_builder.document_questions(doc, {}, "package", "depends on", per_document,
                                                  random.Random(seed), kinds=order)
            return [qa.kind for qa in asked]

        # on offer: one definition, one field (at most), two clozes (one per prose sentence)
        assert kinds(2, qa_builder.KINDS) == ["definition", "field"]
        assert kinds(3, qa_builder.KINDS) == ["definition", "field", "cloze"]
        assert kinds(2, ("cloze", "definition")) == ["cloze", "definition"]
        assert kinds(4, ("cloze", "definition")) == ["cloze", "definition", "cloze"]
        assert kinds(1, ("field", "cloze")) == ["field"]
        assert kinds(3, ("cloze",)) == ["cloze", "cloze"]


def test_a_two_hop_question_asks_through_the_single_link_without_naming_its_target():
    a = Document("a", "foo-utils", "Package: foo-utils. Section: utils.", {"links": ["libfoo1"]})
    b = Document("b", "libfoo1", "Package: libfoo1. Maintainer: Jane Roe <jane@example.org>.")
    (qa,) = qa_builder.two_hop_questions(a, {"libfoo1": b, "foo-utils": a}, "package", "depends on", random.Random(0))
    assert qa.gold_doc_ids == ("a", "b") and qa.answers[0] == "Jane Roe"
    assert "foo-utils" in qa.question and "libfoo1" not in qa.question and "maintainer" in qa.question
    two_links = Document("a", "foo-utils", "Package: foo-utils.", {"links": ["libfoo1", "libbar"]})
    assert qa_builder.two_hop_questions(two_links, {"libfoo1": b, "libbar": b}, "package", "depends on",
                                        random.Random(0)) == []


def _corpus(n: int = 60) -> Corpus:
    rng = random.Random(1)
    people = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth"]
    syllables = ["ka", "lo", "mi", "ren", "tas", "vor", "quel", "dun", "sab", "ert"]
    titles = [f"{syllables[i % 10]}{syllables[(i // 10 + 3) % 10]}{syllables[(i * 7) % 10]}".capitalize() for i in range(n)]
    docs = []
    for i, title in enumerate(titles):
        docs.append(Document(f"c:{i}", title,
                             f"A programming language designed for teaching children about recursion. "
                             f"It was created by {rng.choice(people)} in {1950 + i}. It has {i + 3} keywords in all. "
                             f"Maintainer: Team {title} <t{i}@example.org>.",
                             {"links": [titles[(i + 1) % n]]}))
    return Corpus("toy", docs, link_noun="language", link_verb="borrows from")


def test_answers_are_spans_of_their_gold_documents_and_splits_never_leak():
    corpus = _corpus()
    qs = qa_builder.build([corpus], max_documents=50, per_document=3, unanswerable=0.3, test=0.2, missing=0.1)
    text = {d.id: d.text for s in qs.documents.values() for d in s}
    split_of = {d.id: s for s, docs in qs.documents.items() for d in docs}
    kinds = {qa.kind for s in qs.questions.values() for qa in s}
    assert {"cloze", "field", "definition", "two_hop", "unanswerable", "gold_missing"} <= kinds
    for s, questions in qs.questions.items():
        for qa in questions:
            for answer, gold in zip(qa.answers[:1] * len(qa.gold_doc_ids), qa.gold_doc_ids[-1:]):
                assert answer in text[gold], (qa, text[gold])
            assert all(split_of[g] == s for g in qa.gold_doc_ids)  # training asks only about training documents
    train_ids = {d.id for d in qs.documents["train"]}
    assert not train_ids & {d.id for d in qs.documents["test"] + qs.documents["missing"]}
    assert len({qa.question for qa in qs.questions["train"]} & {qa.question for qa in qs.questions["test"]}) == 0


def test_made_up_names_occur_nowhere_and_gold_missing_answers_nowhere_searchable():
    corpus = _corpus()
    qs = qa_builder.build([corpus], max_documents=50, test=0.2, missing=0.2)
    words = {w.lower() for d in corpus.documents for w in qa_builder._WORD.findall(d.title + " " + d.text)}
    made_up = [qa for s in qs.questions.values() for qa in s if qa.kind == "unanswerable"]
    assert made_up
    for qa in made_up:
        assert not qa.answers and not qa.gold_doc_ids
        assert any(w.lower() not in words for w in qa_builder._WORD.findall(qa.question)), qa.question
    searchable = " ".join(f"{d.title} {d.text}".lower() for s in ("train", "test") for d in qs.documents[s])
    missing = [qa for qa in qs.questions["test"] if qa.kind == "gold_missing"]
    assert missing
    for qa in missing:
        assert qa.answers == () and qa.withheld
        assert not any(a.lower() in searchable for a in qa.withheld), qa  # nothing searchable answers it


def test_the_build_is_deterministic_and_a_document_keeps_its_split_whatever_else_is_there():
    corpus = _corpus()
    a = qa_builder.build([corpus], max_documents=50)
    b = qa_builder.build([Corpus("toy", list(reversed(corpus.documents)), link_noun="language",
                                 link_verb="borrows from")], max_documents=50)
    assert sorted(qa.question for qa in a.questions["train"]) == sorted(qa.question for qa in b.questions["train"])
    fewer = qa_builder.build([Corpus("toy", corpus.documents[:30])], max_documents=50)
    split_a = {d.id: s for s, docs in a.documents.items() for d in docs}
    assert all(split_a.get(d.id, s) == s for s, docs in fewer.documents.items() for d in docs)


def run_qa(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hybridchat.qa", *args], capture_output=True, text=True, cwd=cwd)


def test_the_command_builds_from_your_documents_and_never_overwrites_unasked(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d.to_json()) + "\n" for d in _corpus().documents))
    out = tmp_path / "set"
    r = run_qa("build", f"sources=[{docs}]", f"out={out}", "test=0.2")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["docs.jsonl"]["documents"] == 60
    for name, digest in manifest["files"].items():
        assert corpora.sha256_file(out / name) == digest
    from hybridchat.core.questions import read_questions

    assert read_questions(out / "test.jsonl") and read_questions(out / "train.jsonl")
    rows = {name: [json.loads(line) for line in (out / name).read_text().splitlines()]
            for name in ("train.jsonl", "test.jsonl", "train_2hop.jsonl")}
    assert all(len(r["gold_doc_ids"]) <= 1 for r in rows["train.jsonl"] + rows["test.jsonl"])
    assert rows["train_2hop.jsonl"] and all(len(r["gold_doc_ids"]) == 2 for r in rows["train_2hop.jsonl"])
    train_docs = {json.loads(line)["id"] for line in (out / "train_documents.jsonl").read_text().splitlines()}
    assert {g for r in rows["train.jsonl"] + rows["train_2hop.jsonl"] for g in r["gold_doc_ids"]} <= train_docs
    before = (out / "train.jsonl").read_bytes()
    r = run_qa("build", f"sources=[{docs}]", f"out={out}", "seed=3")
    assert r.returncode == 2 and r.stderr.startswith("error: out=") and len(r.stderr.splitlines()) == 1
    assert (out / "train.jsonl").read_bytes() == before
    r = run_qa("build", "sources=[no_such_source]", f"out={tmp_path / 'x'}")
    assert r.returncode == 2 and "no_such_source" in r.stderr and not (tmp_path / "x").exists()
    r = run_qa("build", f"sources=[{docs}]", f"out={tmp_path / 'y'}", "test=0.6", "missing=0.5")
    assert r.returncode == 2 and "test=0.6 + missing=0.5" in r.stderr
    for bad in ("[cloze,trivia]", "[cloze,cloze]", "[]"):
        r = run_qa("build", f"sources=[{docs}]", f"out={tmp_path / 'z'}", f"kinds={bad}")
        assert r.returncode == 2 and r.stderr.startswith("error: kinds=") and len(r.stderr.splitlines()) == 1, r.stderr
        assert not (tmp_path / "z").exists()
    r = run_qa("build", f"sources=[{docs}]", f"out={tmp_path / 'z'}", "kinds=[cloze]")
    assert r.returncode == 0, r.stderr
    asked = json.loads((tmp_path / "z" / "manifest.json").read_text())["questions"]["train"]
    assert set(asked) <= {"cloze", "two_hop", "unanswerable"} and asked["cloze"] > 0, asked


def test_python_docs_are_prose_paragraphs_of_the_running_pythons_reference():
    corpus = corpora.read_python_docs()
    assert corpus.provenance["version"] == sys.version.split()[0]
    assert len(corpus.documents) > 100
    for d in corpus.documents:
        assert len(d.text.split()) >= 12 and "::=" not in d.text  # grammar and code blocks left out
    assert any(d.title == 'The "if" statement' and d.text.startswith("It selects exactly one of the suites by evaluating")
               for d in corpus.documents)


def test_a_made_up_name_is_never_a_word_of_the_corpus():
    """Every recombination of these titles but one ("korumi") is a word of the corpus: whatever
    the draws, the name made is that one, or none."""
    taken = "koora kora korora korra koumi komi kormi lumi"
    names = qa_builder.NameMaker([Document("a", "Kora", f"Words: {taken}."), Document("b", "Lumi", "x")])
    made = {names.make("Kora", random.Random(seed)) for seed in range(40)}
    assert made <= {"Korumi", None} and "Korumi" in made
