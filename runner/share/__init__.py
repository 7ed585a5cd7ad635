"""Sharing a finished run: its numbers to experiment trackers (track.py, `report_to:`), the model and a card
written from the run to a hub repo (push.py, card.py), its chat as a deployable Space (space.py). Everything
is read from the run directory (summary.py); nothing is contacted unless the recipe or a command asks."""
