"""Reading probe: can a checkpoint look a fact up in a document it has never seen?

    python -m hybridchat.bench reading outputs/checkpoints/hybrid_tiny/pretrain

For every step folder under the directory: a held-out person's document, then "Question: ...
Answer:" in the pretraining text's own format, greedy completion, exact match against the answer.
The people are held out of all training text, so only reading the document answers. With
--documents K the person's document is one of K, the others about namesakes (people who share the
surname, else the first name), in random order: reading the right one is the test.
"""

from __future__ import annotations

import argparse
import random

from hybridchat.bench import report
from hybridchat.core.documents import Document
from hybridchat.core.metrics import bootstrap_ci, exact_match
from hybridchat.infra import checkpoint
from hybridchat.model.engine import Engine
from hybridchat.training.runs import load_run


def namesake_order(gold: Document, people: list[Document], rng: random.Random) -> list[Document]:
    """Everyone but gold's person, those who share its surname first, then its first name, then
    anyone (ties in random order): the hardest distractors first."""
    first, last = gold.title.split()[0], gold.title.split()[-1]
    others = [d for d in people if d.id != gold.id]
    return sorted(others, key=lambda d: (d.title.split()[-1] != last, d.title.split()[0] != first, rng.random()))


def namesakes(gold: Document, people: list[Document], k: int, rng: random.Random) -> list[Document]:
    """k documents: gold and the k - 1 first of namesake_order, shuffled."""
    chosen = [gold, *namesake_order(gold, people, rng)[:k - 1]]
    rng.shuffle(chosen)
    return chosen


def probe(path, n: int, k: int = 1) -> dict:
    run = load_run(path)
    model, tok, meta, world = run.model, run.tokenizer, run.meta, run.world
    documents = {d.id: d for d in world.documents()}
    people = [d for d in documents.values() if d.metadata["type"] == "person"]
    rng = random.Random(0)
    questions = rng.sample(world.questions("heldout", 1), n)
    texts = ["\n\n".join(d.text for d in namesakes(documents[q.gold_doc_ids[0]], people, k, rng)) for q in questions]
    prompts = [[tok.bos_id] + tok.encode(f"{text} Question: {q.question} Answer:") for text, q in zip(texts, questions)]
    result = Engine(model).generate(prompts, max_new_tokens=12, temperature=0, stop_tokens=[tok.bos_id])
    replies = [tok.decode(t).split(". Question")[0].strip().rstrip(".") for t in result.tokens]
    mean, lo, hi = bootstrap_ci([exact_match(r, q.answers) for r, q in zip(replies, questions)])
    return {"checkpoint": f"{meta['stage']}/{path.name}", "questions": n, "documents": k, "em": round(mean, 3),
            "em_low": round(lo, 3), "em_high": round(hi, 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hybridchat.bench reading", description=__doc__.split("\n")[0])
    p.add_argument("directory", help="a stage's checkpoint folder (its step_* folders are probed)")
    p.add_argument("-n", type=int, default=100, help="held-out questions per checkpoint")
    p.add_argument("--documents", type=int, default=1, help="documents per question: the person's and namesakes'")
    p.add_argument("--out", default="outputs/bench/reading")
    args = p.parse_args(argv)
    if args.documents < 1:
        p.error(f"--documents={args.documents} must be >= 1")
    rows = [probe(path, args.n, args.documents) for path in checkpoint.list_checkpoints(args.directory)]
    report.save("reading", rows, ["checkpoint", "questions", "documents", "em", "em_low", "em_high"], args.out)


if __name__ == "__main__":
    main()
