"""Data: tokenizer, the embedded synthetic world, text loaders and chat rendering."""
