"""Data: TFDS sources over bundled package files, tokenizer, SeqIO tasks."""
