"""An evaluation's report: mean and 95% bootstrap interval of every rate (score dicts from
hybridchat.rag.answer.score), the markdown table and the figure that python -m hybridchat.evaluate
writes (eval.md, eval.png)."""

from __future__ import annotations

from typing import Any

from hybridchat.core.metrics import bootstrap_auroc_ci, bootstrap_ci

ANSWERABLE_RATES = ("em", "f1", "hallucination", "false_abstention", "citation", "gold_in_context")
COLUMNS = (("em", "EM"), ("f1", "F1"), ("hallucination", "hallucination"), ("false_abstention", "false abstention"),
           ("citation", "citation"), ("gold_in_context", "gold in context"),
           ("abstain_unanswerable", "abstains (unanswerable)"),
           ("hallucination_unanswerable", "hallucination (unanswerable)"), ("auroc", "AUROC"))
HOP_RATES = ("em", "f1", "hallucination", "false_abstention", "all_gold_in_context", "hops", "malformed", "seconds")
HOP_COLUMNS = (("em", "EM"), ("f1", "F1"), ("hallucination", "hallucination"), ("false_abstention", "false abstention"),
               ("all_gold_in_context", "both gold documents shown"), ("hops", "retrievals per question"),
               ("malformed", "malformed replies"), ("seconds", "seconds per answer"), ("abstain_unanswerable", "abstains (unanswerable)"),
               ("hallucination_unanswerable", "hallucination (unanswerable)"), ("auroc", "AUROC"))


def columns_for(hops: int) -> tuple[tuple[str, str], ...]:
    """The table's (key, title) columns for questions of `hops` hops."""
    if hops < 2:
        return COLUMNS
    gold = "both gold documents shown" if hops == 2 else f"all {hops} gold documents shown"
    return tuple((key, gold if key == "all_gold_in_context" else title) for key, title in HOP_COLUMNS)


def summarize(scores: list[dict], n_resamples: int, seed: int, rates: tuple[str, ...] = ANSWERABLE_RATES
              ) -> dict[str, Any]:
    """Mean and 95% interval of every rate (answerable and unanswerable questions apart), and the
    AUROC of confidence separating them."""
    answerable = [s for s in scores if s["em"] is not None]
    unanswerable = [s for s in scores if s["em"] is None]
    out: dict[str, Any] = {"answerable": len(answerable), "unanswerable": len(unanswerable)}
    for key in rates:
        values = [s[key] for s in answerable]
        if any(v is not None for v in values):
            out[key] = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    for key in ("abstain", "hallucination"):
        if unanswerable:
            out[f"{key}_unanswerable"] = bootstrap_ci([s[key] for s in unanswerable], n_resamples=n_resamples,
                                                      seed=seed)
    if answerable and unanswerable:
        out["auroc"] = bootstrap_auroc_ci([s["confidence"] for s in answerable],
                                          [s["confidence"] for s in unanswerable], n_resamples=n_resamples, seed=seed)
    return out


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        mean, lo, hi = value
        if mean != mean:
            return "-"
        # No resample held a defined item (bootstrap_ci): a rate, but no interval around it.
        return f"{mean:.3f} [no interval]" if lo != lo else f"{mean:.3f} [{lo:.2f}, {hi:.2f}]"
    return "-"


def threshold_lines(used: dict[str, Any] | None) -> list[str]:
    """What decided answer or abstain (evaluate's report["abstain_threshold"]), and a warning where
    the threshold was chosen on the questions evaluated."""
    if used is None:
        return []
    if used["value"] is None:
        lines = [f"Abstains only where the model writes the abstention ({used['source']})."]
    else:
        score = (f"the confidence x coverage^{used['coverage_exponent']:g} (the share of the question's terms the "
                 "documents shown hold, rarer terms weighing more)" if used.get("coverage_exponent") else "the confidence")
        lines = [f"Abstains exactly where {score} is below {used['value']:.4g} ({used['source']}); at or above "
                 "it, where the model writes the abstention, its most likely other reply is given."]
    if used.get("chosen_on_these_questions"):
        lines.append("**Warning: the threshold was chosen on these same questions: the rates below are optimistic; "
                     "calibrate on validation questions apart from the ones you evaluate on.**")
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    hops = report.get("hops", 1)
    columns = columns_for(hops)
    kind = f"{hops}-hop" if hops >= 2 else "answerable"
    lines = [f"# Evaluation: {report['run_name']} / {report['stage']} (step {report['checkpoint']})", "",
             f"{report['answerable']} {kind} held-out questions, {report['unanswerable']} unanswerable; "
             f"retriever {report['retriever']} top-{report['top_k']}; 95% bootstrap intervals; seed "
             f"{report.get('seed', '?')} (the questions drawn and the bootstrap).", "",
             *threshold_lines(report.get("abstain_threshold")),
             *(["Each document read alone, in rank order (reading=rank_order): the answer is read from the first "
                "document the model does not abstain on, its confidence the best document's; the context budget "
                "reads them together.", ""] if report.get("reading") else []),
             "| condition | " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for c in report["conditions"]:
        lines.append(f"| {c['condition']} | " + " | ".join(_fmt(c.get(k)) for k, _ in columns) + " |")
    if hops >= 2:
        shown = ("Both gold documents shown: the first hop's and the answer's document" if hops == 2 else
                 f"All {hops} gold documents shown: every hop's document, the answer's included,")
        lines += ["", f"Multi-hop settings: {report['multihop']}. Retrievals per question: 0 closed-book, 1 "
                  f"single-shot, one more per followed query. {shown} among all the documents the model was shown. "
                  "Hallucination: answered, not abstained, and wrong. Malformed replies: a query not followed "
                  "(past max_hops, empty, or no room for its documents), a reply that never ended, or an answer "
                  "citing no document shown.", "", "## Example traces", ""]
        for c in report["conditions"][1:report["primary"] + 1]:
            for e in c["examples"][:2]:
                hops = " -> ".join([str(e["hops"][0]["documents"])] + [
                    f"query {h['query']!r} {h['documents']}" + ("" if h["status"] == "ok" else f" ({h['status']})")
                    for h in e["hops"][1:]])
                lines.append(f"- {c['condition']}: {e['question']} {hops} => {e['reply']!r} (gold {e['gold']})")
        return "\n".join(lines) + "\n"
    lines += ["", "On answerable questions: EM and F1 (SQuAD-normalised), hallucination (answered, not abstained, "
              "and wrong), false abstention, citation accuracy (correct answers whose cited document states the "
              "answer), gold in context (the gold document among those shown). On unanswerable questions: "
              "abstention, and hallucination (any answer). AUROC: the confidence 1 - P(abstain) (weighed "
              "by coverage where the threshold is) separating answerable from unanswerable questions."]
    if report["context_budget"]:
        lines += ["", "## Context budget", "", "| model | pattern | documents | context tokens | trained context | "
                  "EM | time to first token (ms) |", "|" + "---|" * 7]
        for r in report["context_budget"]:
            lines.append(f"| {r['model']} | {r['pattern']} | {r['documents']} | {r['context_tokens']} | "
                         f"{r['trained_context']} | {_fmt(r['em'])} | {r['ttft_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = report["context_budget"]
    fig, axes = plt.subplots(1, 3 if budget else 1, figsize=(15 if budget else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = [c["condition"] for c in report["conditions"]]
    for offset, key in ((-0.2, "em"), (0.2, "hallucination")):
        means = [c[key][0] if key in c else 0 for c in report["conditions"]]
        errs = [[m - c[key][1] if key in c else 0 for m, c in zip(means, report["conditions"])],
                [c[key][2] - m if key in c else 0 for m, c in zip(means, report["conditions"])]]
        ax.bar([i + offset for i in range(len(names))], means, 0.4, yerr=errs, label=key, capsize=3)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out questions")
    if budget:
        for model in dict.fromkeys(r["model"] for r in budget):
            rows = [r for r in budget if r["model"] == model]
            axes[0][1].plot([r["documents"] for r in rows], [r["em"][0] for r in rows], marker="o", label=model)
            axes[0][2].plot([r["documents"] for r in rows], [r["ttft_ms"] for r in rows], marker="o", label=model)
        for ax, title in ((axes[0][1], "exact match"), (axes[0][2], "time to first token (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("documents in context")
            ax.set_title(title)
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
