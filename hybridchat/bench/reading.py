"""Reading probe: can a checkpoint look a fact up in a document it has never seen?

    python -m hybridchat.bench reading outputs/checkpoints/hybrid_tiny/pretrain

For every step folder under the directory: a held-out person's document, then "Question: ...
Answer:" in the pretraining text's own format, greedy completion, exact match against the answer.
The people are held out of all training text, so only reading the document answers.
"""

from __future__ import annotations

import argparse
import random

from hybridchat import checkpoint
from hybridchat.bench import report
from hybridchat.data.world import World, WorldConfig
from hybridchat.engine import Engine
from hybridchat.metrics import bootstrap_ci, exact_match


def probe(path, n: int) -> dict:
    model, tok, meta = checkpoint.load_model(path)
    world = World.generate(WorldConfig(**meta["config"]["world"]))
    documents = {d.id: d for d in world.documents()}
    questions = random.Random(0).sample(world.questions("heldout", 1), n)
    prompts = [[tok.bos_id] + tok.encode(f"{documents[q.gold_doc_ids[0]].text} Question: {q.question} Answer:")
               for q in questions]
    result = Engine(model).generate(prompts, max_new_tokens=12, temperature=0, stop_tokens=[tok.bos_id])
    replies = [tok.decode(t).split(". Question")[0].strip().rstrip(".") for t in result.tokens]
    mean, lo, hi = bootstrap_ci([exact_match(r, q.answers) for r, q in zip(replies, questions)])
    return {"checkpoint": f"{meta['stage']}/{path.name}", "questions": n, "em": round(mean, 3),
            "em_low": round(lo, 3), "em_high": round(hi, 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hybridchat.bench reading", description=__doc__.split("\n")[0])
    p.add_argument("directory", help="a stage's checkpoint folder (its step_* folders are probed)")
    p.add_argument("-n", type=int, default=100, help="held-out questions per checkpoint")
    p.add_argument("--out", default="outputs/bench/reading")
    args = p.parse_args(argv)
    rows = [probe(path, args.n) for path in checkpoint.list_checkpoints(args.directory)]
    report.save("reading", rows, ["checkpoint", "questions", "em", "em_low", "em_high"], args.out)


if __name__ == "__main__":
    main()
