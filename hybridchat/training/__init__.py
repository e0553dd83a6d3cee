"""The one training loop and the stages it runs (pretrain, mid, rag, refrag, distill)."""
