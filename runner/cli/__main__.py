"""`python -m runner.cli ...` (what `accelerate launch -m runner.cli` runs): the `tunebook` command."""
from . import main

main()
