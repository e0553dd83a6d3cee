"""What a run stands on: the config schema, device and ranks, checkpoints, tracking, preemption, the
run context that builds data, knowledge base and tokenizer on first use."""
