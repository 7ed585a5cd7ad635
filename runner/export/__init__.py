"""After training: merge the adapters into the base (merge.py) and write a verified GGUF (to_gguf.py) with
tunebook's own pure-Python writer (gguf_writer.py, gguf_vocab.py) and its checks (gguf_verify.py); the model
after an earlier stage, or the base, as a GGUF for the evaluation gate (stage_gguf.py)."""
