"""Measuring a run: `tunebook eval` on any target (evaluate.py), the forgetting matrix (forgetting.py), the
checks of the exported GGUF (quality.py), the evaluation gate on questions never trained on (gate.py), the
recipe's targets (targets.py) and report.md (report.py)."""
