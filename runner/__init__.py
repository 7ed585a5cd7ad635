"""tunebook's runner: recipes, data, training, export and the `tunebook` command."""
import logging

# bitsandbytes warns at import that an optional CPU kernel package is absent; its pure-torch path is used.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
