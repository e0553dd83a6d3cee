"""The model: hybrid attention / Mamba-2 blocks and their config, inference caches, the generation
engine, attention-to-Mamba conversion. It stands on core alone: no Hydra, no tokenizer, no checkpoints."""
