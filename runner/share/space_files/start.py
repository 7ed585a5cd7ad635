"""Start this Space's chat: the Chainlit app of chat/ over the GGUF that space.json names, on $HOST:$PORT
(0.0.0.0:7860 in the container, the port the Space's README declares).

With `model_repo` in space.json the GGUF is downloaded from that hub repo first (HF_TOKEN, a Space secret,
for a private one); otherwise it is the file beside this script."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def model_path(settings: dict) -> Path:
    if settings.get("model_repo"):
        from huggingface_hub import hf_hub_download

        print(f"downloading {settings['model_file']} from {settings['model_repo']}", flush=True)
        return Path(hf_hub_download(settings["model_repo"], settings["model_file"], revision=settings.get("revision")))
    return HERE / settings["model_file"]


def main() -> None:
    settings = json.loads((HERE / "space.json").read_text(encoding="utf-8"))
    sys.path.insert(0, str(HERE))
    from chat.engine import ChatError
    from chat.serve import serve

    host, port = os.environ.get("HOST", "0.0.0.0"), int(os.environ.get("PORT", "7860"))
    model = model_path(settings)
    print(f"serving {model.name} on http://{host}:{port}", flush=True)
    try:
        serve(model, host=host, port=port, system_prompt=settings.get("system_prompt"), title=settings.get("title"),
              sampling=settings.get("sampling"))
    except ChatError as exc:
        sys.exit(f"space: {exc}")


if __name__ == "__main__":
    main()
