"""Benchmarks: python -m hybridchat.bench {train,mixer,decode,retrieval,reading,gpu_check} [options].

Each prints a table and saves JSON (and a PNG where a curve says more) under outputs/bench/<name>/.
Numbers depend on the machine; the JSON records which one.
"""
