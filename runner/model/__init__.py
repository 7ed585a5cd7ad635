"""The base model of a recipe: which one `model.base` names and its tokenizer (base.py), a GGUF shipped in a
Python package converted once (package.py), loading it with the stage's adapter (load.py), and the LM head
that scores only trained positions (fast_head.py)."""
