"""The label convention every part of tunebook shares (Hugging Face's): labels sit at the same positions as
input_ids, the model shifts them, and IGNORE_INDEX marks a token that is neither trained nor scored."""
IGNORE_INDEX = -100
