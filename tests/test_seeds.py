"""Random streams (hybridchat/core/seeds.py): one per consumer, keyed by run seed, name and position."""

import hashlib
from itertools import product

import pytest

from hybridchat.core.seeds import DATA_ORDER, EXAMPLES, ROLLOUTS, STREAMS, python_rng, stream_seed


def test_a_stream_seed_is_the_sha256_of_seed_stream_and_keys_as_json():
    """Hand reference: the first 8 bytes of SHA-256 over the JSON text, big-endian, less one bit."""
    digest = hashlib.sha256(b'[0, "data_order", "epoch", 1000]').digest()
    assert stream_seed(0, DATA_ORDER, "epoch", 1000) == int.from_bytes(digest[:8], "big") >> 1
    assert 0 <= stream_seed(7, ROLLOUTS, 3) < 2**63


def test_streams_never_share_seeds_across_consumers_positions_or_run_seeds():
    """Every (seed, stream, position) of a small grid gets its own seed; among them the pairs that
    collided before: seed * 1000 + epoch (seed 1's epoch 0 was seed 0's epoch 1000), and rag's
    examples keyed "{seed}/{epoch}/{i}" like the batch pools' "{seed}/{epoch}/{first}"."""
    grid = [(seed, stream, *keys) for seed, stream, keys in
            product(range(3), STREAMS, [("epoch", 0), ("epoch", 1000), ("pool", 0, 0), (0, 0), (0,), ("0", 0)])]
    seeds = {stream_seed(*args) for args in grid}
    assert len(seeds) == len(grid)
    assert stream_seed(1, DATA_ORDER, 0) != stream_seed(0, DATA_ORDER, 1000)
    assert stream_seed(5, EXAMPLES, 2, 3) != stream_seed(5, DATA_ORDER, 2, 3)
    assert stream_seed(5, EXAMPLES, "a/b") != stream_seed(5, EXAMPLES, "a", "b")


def test_a_python_stream_repeats_itself_and_no_other():
    draws = [python_rng(3, EXAMPLES, 1, 2).random() for _ in range(2)]
    assert draws[0] == draws[1] != python_rng(3, EXAMPLES, 1, 3).random()


def test_an_unknown_stream_name_is_refused():
    with pytest.raises(ValueError, match="unknown random stream 'evaluations'"):
        stream_seed(0, "evaluations")
