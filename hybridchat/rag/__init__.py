"""Answering from retrieved documents: prompts, reading a reply (citation, abstention), multi-hop search."""
