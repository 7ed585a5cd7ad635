"""A stage's data, start to end (prepare.py): source (sources.py) -> conversations (formats.py) -> chat
template (templates.py, render.py) -> tokens and labels (tokenize.py) -> train/validation split (split.py),
cached on disk (cache.py), reported (report.py), and batched or packed for training (pack.py)."""
