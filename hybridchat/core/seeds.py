"""Random streams: one run seed, an independent stream for every consumer of randomness.

Each consumer draws from its own generator, made here from the run's `seed`, the consumer's stream
name and the numbers that say where it is (an epoch, an item, a batch index), never from Python's,
NumPy's or PyTorch's global generators. So nothing one consumer draws moves another's draws:
evaluating more or less often (stage.eval_every) trains the same weights, and a resumed run finds
every stream where it was without replaying it.

    DATA_ORDER   the order of documents and examples each epoch, batch pools, GRPO's questions
    EXAMPLES     how one training example is made (documents shown, the gold one's place, follow-ups)
    SPLIT        which training items a stage holds out for validation
    EVALUATION   what evaluation asks and shows (held-out samples, validation examples)
    ROLLOUTS     the trajectories GRPO samples

Model initialisation draws from PyTorch's global generator, seeded with the run seed by
hybridchat.infra.runtime.setup just before the model is built: nothing else draws from it.

Seeds are hashed, not added: `seed * 1000 + epoch` made seed 1's first epoch seed 0's 1000th, and
two consumers keyed alike ("{seed}/{epoch}/{i}") drew the very same numbers.
"""

from __future__ import annotations

import hashlib
import json
import random

DATA_ORDER = "data_order"
EXAMPLES = "examples"
SPLIT = "split"
EVALUATION = "evaluation"
ROLLOUTS = "rollouts"
STREAMS = (DATA_ORDER, EXAMPLES, SPLIT, EVALUATION, ROLLOUTS)


def stream_seed(seed: int, stream: str, *keys: int | str) -> int:
    """A 63-bit seed for `stream` at `keys`, from the run seed: SHA-256 of all three, so any two
    different (seed, stream, keys) get unrelated seeds."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {STREAMS}")
    text = json.dumps([seed, stream, *keys])  # JSON keeps ("a/b",) and ("a", "b") apart
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def python_rng(seed: int, stream: str, *keys: int | str) -> random.Random:
    """A random.Random of its own for `stream` at `keys`."""
    return random.Random(stream_seed(seed, stream, *keys))
