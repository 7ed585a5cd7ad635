"""`tunebook push` on a tiny finished run. The hub cannot be reached from the test machines: the upload goes,
through the real huggingface_hub client (HF_ENDPOINT), to tests/hub_stand_in.py, a local stand-in for the
hub's HTTP API that checks the token, each LFS object's sha256 and the card's metadata, and keeps what arrives.
A Space that points at the pushed repo downloads its GGUF from there too."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from hub_stand_in import StandInHub
from share_support import SYSTEM_PROMPT, trained_run
from train_support import ROOT

pytestmark = pytest.mark.slow  # the shared tiny run trains, exports and checks a model first (~1-2 min)

TOKEN = "hf_stand_in_token"
OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # set for every test (conftest.py); an upload needs them unset


def tunebook(*args, hub: StandInHub | None = None, token: str | None = TOKEN, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE + ("HF_TOKEN",)}
    env.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", **extra_env)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def front_matter(text: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.S)[1])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_dry_run_builds_the_folder_and_the_card_and_sends_nothing(tmp_path):
    run = trained_run()
    out = tmp_path / "hub"
    with StandInHub(TOKEN) as hub:
        done = tunebook("push", str(run), "--repo", "alice/tiny-vet", "--dry-run", "--out", str(out), hub=hub)
    assert done.returncode == 0, done.stderr[-3000:]
    assert hub.requests == []
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            "tiny-vet-q8_0.gguf", "recipe.yaml", "report.md", "forgetting.json", "quality.json",
            "tiny-vet-vet-curves.png"} <= names
    assert "tiny-vet-q8_0.gguf" in done.stdout and "README.md" in done.stdout  # the file list, with sizes
    assert os.path.samefile(out / "tiny-vet-q8_0.gguf", run / "tiny-vet-q8_0.gguf") or \
        sha256((out / "tiny-vet-q8_0.gguf").read_bytes()) == sha256((run / "tiny-vet-q8_0.gguf").read_bytes())

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local base is not a hub id
    matrix = json.loads((run / "forgetting.json").read_text())
    results = {(r["dataset"]["name"], m["name"]): m["value"] for r in meta["model-index"][0]["results"]
               for m in r["metrics"]}
    assert results[("general validation set", "perplexity after stage vet")] == pytest.approx(matrix["ppl"]["vet"]["general"], abs=1e-4)
    assert results[("vet validation set", "perplexity after stage vet")] == pytest.approx(matrix["ppl"]["vet"]["vet"], abs=1e-4)
    for section in ("## Training", "### Forgetting matrix", "### Quality gate", "### Curves", "## Limitations"):
        assert section in card
    assert SYSTEM_PROMPT in card and "![tiny-vet-vet-curves](tiny-vet-vet-curves.png)" in card
    assert f"{matrix['ppl']['vet']['vet']:.3f}" in card
    assert str(tmp_path.parent) not in (out / "recipe.yaml").read_text()  # no path of this machine goes out
    assert "/tmp/" not in card

    again = tunebook("push", str(run), "--repo", "alice/tiny-vet", "--dry-run", "--out", str(out))
    assert again.returncode == 0  # a folder it built before is built again
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    refused = tunebook("push", str(run), "--repo", "alice/tiny-vet", "--dry-run", "--out", str(stranger))
    assert refused.returncode == 2 and "not a folder tunebook built" in refused.stderr
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_push_uploads_every_file_and_the_card_to_the_hub_api(tmp_path):
    run = trained_run()
    with StandInHub(TOKEN) as hub:
        done = tunebook("push", str(run), "--repo", "alice/tiny-vet", "--merged", "--private", "--license",
                        "apache-2.0", "--out", str(tmp_path / "hub"), hub=hub)
        assert done.returncode == 0, done.stderr[-3000:]
        files = hub.repos["alice/tiny-vet"]
        assert hub.private["alice/tiny-vet"] and len(hub.commits["alice/tiny-vet"]) == 1
        assert f"pushed: {hub.url}/alice/tiny-vet/commit/" in done.stdout

        local = {str(p.relative_to(tmp_path / "hub")): p.read_bytes() for p in (tmp_path / "hub").rglob("*") if p.is_file()}
        assert sorted(files) == sorted(local)
        assert {name: sha256(data) for name, data in files.items()} == {name: sha256(data) for name, data in local.items()}
        assert sha256(files["tiny-vet-q8_0.gguf"]) == sha256((run / "tiny-vet-q8_0.gguf").read_bytes())
        assert sha256(files["merged/model.safetensors"]) == sha256((run / "merged" / "model.safetensors").read_bytes())
        assert files["adapter_model.safetensors"] == (run / "vet" / "adapter" / "adapter_model.safetensors").read_bytes()
        # the LFS protocol carried the large files, and the card's metadata passed the hub's check
        assert {m for m, p in hub.requests if p.startswith("/lfs-upload/")} == {"PUT"}
        card = front_matter(files["README.md"].decode())
        assert hub.validated[-1] == card and card["license"] == "apache-2.0"
        assert card["model-index"][0]["results"][0]["metrics"][0]["type"] == "perplexity"

        # a Space that points at this repo downloads the GGUF from it when it starts
        from runner.run_dir import RunDir
        from runner.share.space import build_space

        space = build_space(RunDir(run), tmp_path / "space", model_repo="alice/tiny-vet")
        assert not (space / "model").exists()
        env = {k: v for k, v in os.environ.items() if k not in OFFLINE}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"))
        fetched = subprocess.run([sys.executable, "-c", "import json, start; "
                                  "print(start.model_path(json.load(open('space.json'))))"],
                                 cwd=space, env=env, capture_output=True, text=True, timeout=120)
        assert fetched.returncode == 0, fetched.stderr[-2000:]
        path = fetched.stdout.strip().splitlines()[-1]
        assert sha256(open(path, "rb").read()) == sha256((run / "tiny-vet-q8_0.gguf").read_bytes())


def test_push_errors_are_clear_and_keep_the_folder(tmp_path):
    run = trained_run()
    bad = tunebook("push", str(run), "--repo", "not a repo", "--dry-run")
    assert bad.returncode == 2 and "not a hub repo id" in bad.stderr and "Traceback" not in bad.stderr
    with StandInHub(TOKEN) as hub:
        no_token = tunebook("push", str(run), "--repo", "alice/x", "--out", str(tmp_path / "a"), hub=hub, token=None,
                            HF_HOME=str(tmp_path / "hf-home"))
        assert no_token.returncode == 2 and "no hub token" in no_token.stderr and hub.requests == []
        refused = tunebook("push", str(run), "--repo", "alice/x", "--out", str(tmp_path / "b"), hub=hub, token="wrong",
                           HF_HOME=str(tmp_path / "hf-home"))
        assert refused.returncode == 2 and "upload to" in refused.stderr and "Traceback" not in refused.stderr
        assert (tmp_path / "b" / "README.md").is_file() and "alice/x" not in hub.repos
