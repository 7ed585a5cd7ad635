"""Training a stage: the backend protocol (backend.py), the hf trainer (hf.py, hf_trainer.py) and the
trainers that run in their own environments (axolotl.py, unsloth.py, external.py)."""
