import importlib
import sys

from hybridchat.core.errors import run_or_exit

BENCHMARKS = {
    "train": "training step tokens/s and peak memory of the tiny models vs sequence length",
    "mixer": "Mamba-2 SSD vs attention vs peer Mamba implementations, fwd+bwd vs length",
    "decode": "per-token decode latency and cache bytes vs context length",
    "context": "EM, time to first token, decode speed and cache vs documents in context, gold position swept",
    "retrieval": "build time, queries/s and memory of each retriever vs rank-bm25",
    "reading": "exact match of a checkpoint reading a held-out document in its pretraining format",
    "perplexity": "bits per byte and token perplexity of checkpoints on held-out text (prose, Python docs, a file)",
    "serve": "N concurrent clients against python -m hybridchat.serve: failures, p50/p95 latency, tokens/s, RSS",
    "gpu_check": "minutes-long check of the GPU path: gpu tests, d12 training tok/s + MFU, scans, kernels",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print("usage: python -m hybridchat.bench NAME [options]\n", file=sys.stderr)
        for name, what in BENCHMARKS.items():
            print(f"  {name:10s} {what}", file=sys.stderr)
        sys.exit(2)
    # A benchmark's UserError (a missing checkpoint, a bad option value) ends as one `error:` line.
    run_or_exit(importlib.import_module(f"hybridchat.bench.{sys.argv[1]}").main, sys.argv[2:])


if __name__ == "__main__":
    main()
