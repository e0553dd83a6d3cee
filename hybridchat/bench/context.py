"""Reading many documents: exact match, time to first token, decode speed and inference memory
against the number of documents in context, for several checkpoints (the three bodies) in one figure.

    python -m hybridchat.bench context --checkpoints outputs/checkpoints/transformer_tiny/rag \\
        outputs/checkpoints/hybrid_tiny/rag outputs/checkpoints/mamba_tiny/rag \\
        [--documents 1 2 4 8 16 32 64] [--sweep-at 32] [--positions first middle last] [-n 100]

Each checkpoint answers the rag stage's own prompts: a held-out person's question (never trained
on) with K documents, the person's own among K - 1 namesakes' (people sharing the surname, then the
first name: the hardest distractors the world has), at a random rank per question, and at
--sweep-at documents first, in the middle and last ("lost in the middle"). Per K, per checkpoint:
- EM with its 95% bootstrap interval; at --sweep-at, EM at each position (EM: their mean) and
  the spread across them;
- time to first token: the prefill of one such prompt, batch 1, best of 3, median over 5 prompts;
- decode: the median latency of --steps single-token forwards with the cache at that length;
- the inference cache the prompt and its reply hold, split into attention KV, SSM state and the
  pointer's (copy from context) keys: what grows with K and what does not.
Then, for a hybrid beside a transformer, the ratios per K and where the hybrid first reaches the
targets of issue 27 (time to first token <= 0.7x, memory <= 0.3x, EM within 0.05): the crossover.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch

from hybridchat.bench import report
from hybridchat.bench.decode import decode_ms
from hybridchat.bench.reading import namesake_order
from hybridchat.core.documents import Document
from hybridchat.core.errors import UserError
from hybridchat.core.metrics import bootstrap_ci
from hybridchat.core.questions import Question
from hybridchat.infra import checkpoint
from hybridchat.model.engine import time_to_first_token
from hybridchat.rag.answer import Answerer, score
from hybridchat.training.runs import Run, load_run

POSITIONS = ("first", "middle", "last")
RANDOM = "random"  # each question's own rank, drawn with the seed
TIMED_PROMPTS = 5


def place(gold: Document, distractors: list[Document], k: int, position: str,
          rng: random.Random | None = None) -> list[Document]:
    """k documents: the first k - 1 distractors in their order, gold among them first, in the
    middle ((k - 1) // 2 before it), last, or at a random rank (drawn from rng)."""
    if position not in (*POSITIONS, RANDOM):
        raise ValueError(f"position {position!r}: one of {', '.join((*POSITIONS, RANDOM))}")
    others = distractors[:k - 1]
    if len(others) < k - 1:
        raise UserError(f"{k} documents asked for, but the world has only {len(others) + 1} people to show")
    at = rng.randrange(k) if position == RANDOM else {"first": 0, "middle": (k - 1) // 2, "last": k - 1}[position]
    return others[:at] + [gold] + others[at:]


def body(pattern: str) -> str:
    """transformer, mamba or hybrid: what a block pattern's layers are."""
    kinds = set(pattern) & {"A", "M"}
    return "hybrid" if kinds == {"A", "M"} else "transformer" if kinds == {"A"} else "mamba"


def cache_split(model, length: int) -> dict[str, float]:
    """MB the inference cache holds for `length` tokens (batch 1), by kind: attention KV, SSM state
    and the rest (the pointer's keys and the request match's ids), beside the total."""
    per_module = model.allocate_cache(1, length).layer_nbytes()
    kinds = [*model.pattern] + ["pointer"] * (len(per_module) - len(model.pattern))
    mb = {"kv_MB": 0.0, "ssm_MB": 0.0, "pointer_MB": 0.0}
    for kind, nbytes in zip(kinds, per_module):
        mb[{"A": "kv_MB", "M": "ssm_MB"}.get(kind, "pointer_MB")] += nbytes / 2**20
    return {"cache_MB": sum(mb.values()), **mb}


def heldout_cases(run: Run, n: int, seed: int) -> list[tuple[Question, Document, list[Document]]]:
    """n held-out single-hop questions of the run's world, each with its gold document and the other
    people's documents in namesake order."""
    documents = {d.id: d for d in run.world.documents()}
    people = [d for d in documents.values() if d.metadata.get("type") == "person"]
    rng = random.Random(seed)
    heldout = [q for q in run.world.questions("heldout", 1) if q.answers and q.gold_doc_ids]
    if not heldout:
        raise UserError("the checkpoint's world has no held-out people (world.heldout_fraction=0): nothing to read")
    cases = []
    for q in rng.sample(heldout, min(n, len(heldout))):
        gold = documents[q.gold_doc_ids[0]]
        cases.append((q, gold, namesake_order(gold, people, rng)))
    return cases


def measure(run: Run, name: str, documents: list[int], positions: list[str], sweep_at: int, n: int, steps: int,
            batch_tokens: int, max_answer_tokens: int, seed: int) -> list[dict]:
    """One row per K in `documents`: the gold document at each of `positions` where K == sweep_at,
    elsewhere at a random rank per question (one pass)."""
    model = run.model.eval()
    cases = heldout_cases(run, n, seed)
    rows = []
    for k in documents:
        rng = random.Random(seed * 1000 + k)
        shown = {p: [place(gold, others, k, p, rng) for _, gold, others in cases]
                 for p in (positions if k == sweep_at and k > 1 else [RANDOM])}
        answerer = Answerer(model, run.tokenizer, 10**9, max_answer_tokens)  # nothing cut: past the trained context on purpose
        prompts = [answerer.prompt(q.question, d)[0] for (q, _, _), d in zip(cases, next(iter(shown.values())))]
        lengths = [len(p) for p in prompts]
        # Batches bounded in tokens: a 64-document prompt's attention scores at batch 32 would not fit.
        answerer.batch_size = max(1, batch_tokens // max(lengths))
        row = {"model": name, "body": body(model.pattern), "pattern": model.pattern, "documents": k,
               "context_tokens": round(statistics.mean(lengths)), "trained_context": run.config.model.sequence_len}
        em = {}
        for p, docs in shown.items():
            answers = answerer.answer([q.question for q, _, _ in cases], docs)
            em[p] = bootstrap_ci([score(a, q.answers)["em"] for a, (q, _, _) in zip(answers, cases)], seed=seed)
        row["em"] = round(statistics.mean(m for m, _, _ in em.values()), 3)
        row["em_interval"] = {p: [round(lo, 3), round(hi, 3)] for p, (_, lo, hi) in em.items()}
        if RANDOM not in em:
            row |= {f"em_{p}": round(m, 3) for p, (m, _, _) in em.items()}
            row["position_spread"] = round(max(m for m, _, _ in em.values()) - min(m for m, _, _ in em.values()), 3)
        row["ttft_ms"] = 1000 * statistics.median(time_to_first_token(model, p) for p in prompts[:TIMED_PROMPTS])
        row["decode_ms"], _ = decode_ms(model, row["context_tokens"], steps, 1, next(model.parameters()).device)
        row["tok_per_s"] = 1000 / row["decode_ms"]
        row |= cache_split(model, row["context_tokens"] + max_answer_tokens)
        print({c: row[c] for c in ("model", "documents", "context_tokens", "em", "ttft_ms", "cache_MB")}, flush=True)
        rows.append(row)
    return rows


def crossover(rows: list[dict]) -> list[dict]:
    """Per K where a hybrid and a transformer were both measured (the last of each body given): the
    hybrid's time to first token, decode latency and cache as ratios of the transformer's, and its EM
    minus the transformer's."""
    by = {(r["body"], r["documents"]): r for r in rows}
    out = []
    for k in sorted({r["documents"] for r in rows}):
        h, t = by.get(("hybrid", k)), by.get(("transformer", k))
        if h and t:
            out.append({"documents": k, "context_tokens": h["context_tokens"],
                        "ttft_ratio": h["ttft_ms"] / t["ttft_ms"], "decode_ratio": h["decode_ms"] / t["decode_ms"],
                        "cache_ratio": h["cache_MB"] / t["cache_MB"], "em_difference": round(h["em"] - t["em"], 3)})
    return out


def targets(ratios: list[dict], at: int = 32) -> list[dict]:
    """Issue 27's comparisons of the hybrid with the transformer: each one's value and status at `at`
    documents, and the first K measured where it holds (None: at none)."""
    def first(ok) -> int | None:
        return next((r["documents"] for r in ratios if ok(r)), None)

    there = next((r for r in ratios if r["documents"] == at), None)
    checks = [("hybrid time to first token <= 0.7x the transformer's", "ttft_ratio", lambda v: v <= 0.7),
              ("hybrid inference cache <= 0.3x the transformer's", "cache_ratio", lambda v: v <= 0.3),
              ("hybrid EM within 0.05 of the transformer's (or above)", "em_difference", lambda v: v >= -0.05)]
    return [{"target": name, "documents": at, "measured": None if there is None else round(there[key], 3),
             "status": "not measured" if there is None else ("met" if ok(there[key]) else "MISSED"),
             "first_met_at_documents": first(lambda r: ok(r[key]))}
            for name, key, ok in checks]


def figure(rows: list[dict], threads: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("em", "EM (mean over gold positions)", False), ("ttft_ms", "time to first token (ms)", True),
              ("tok_per_s", "decode tokens / s", True), ("cache_MB", "inference cache (MB)", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        for ax, (key, title, log_y) in zip(axes, panels):
            ax.plot([r["documents"] for r in mine], [r[key] for r in mine], marker="o", label=name)
            ax.set_title(title)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log" if log_y else "linear")
    for ax in axes:
        ax.set_xlabel("documents in context")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"reading K documents: held-out questions, batch 1 timings, torch threads: {threads}")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hybridchat.bench context", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="checkpoint step (or stage) folders, e.g. the rag stages of the three tiny bodies")
    parser.add_argument("--documents", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS,
                        help="the gold document's places at --sweep-at documents")
    parser.add_argument("--sweep-at", type=int, default=32,
                        help="documents at which the gold position is swept; elsewhere it is random per question")
    parser.add_argument("-n", type=int, default=100, help="held-out questions per point")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per point")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="prompt tokens per answering batch")
    parser.add_argument("--max-answer-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: torch's default")
    parser.add_argument("--out", default="outputs/bench/context")
    args = parser.parse_args(argv)
    if min(args.documents) < 1 or args.n < 1 or args.steps < 1 or args.batch_tokens < 1:
        raise UserError("--documents, -n, --steps and --batch-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for given in args.checkpoints:
        path = Path(given)
        found = path if (path / "meta.json").is_file() else checkpoint.latest(path)
        if found is None:
            raise UserError(f"--checkpoints {given}: no checkpoint there (a step_* folder or a stage folder holding them)")
        run = load_run(found)
        # run/stage: long_4k/hybrid_tiny/rag and hybrid_tiny/rag are told apart
        name = f"{run.meta.get('run_name') or found.parts[-3]}/{run.meta.get('stage') or found.parts[-2]}"
        rows += measure(run, name, sorted(set(args.documents)), args.positions,
                        args.sweep_at, args.n, args.steps, args.batch_tokens, args.max_answer_tokens, args.seed)
    ratios = crossover(rows)
    checks = targets(ratios, args.sweep_at)
    columns = ["model", "documents", "context_tokens", "em", *[f"em_{p}" for p in args.positions], "position_spread",
               "ttft_ms", "tok_per_s", "cache_MB", "kv_MB", "ssm_MB", "pointer_MB"]
    report.save("context", rows, columns, args.out, figure=figure(rows, torch.get_num_threads()),
                hybrid_over_transformer=ratios, targets=checks, config=vars(args))
    if ratios:
        print(report.format_table(ratios, ["documents", "context_tokens", "ttft_ratio", "decode_ratio", "cache_ratio",
                                           "em_difference"]))
    print(report.format_table(checks, ["target", "documents", "measured", "status", "first_met_at_documents"]))


if __name__ == "__main__":
    main()
