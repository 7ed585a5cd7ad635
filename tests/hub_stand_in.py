"""A local stand-in for the hub's HTTP API, on loopback: the test machines cannot reach the hub, so the tests of
`tunebook push` and of a Space's model download talk to this instead, through the real huggingface_hub client
(HF_ENDPOINT pointed here).

It answers what an upload and a download use: create a repo, ask which files go through LFS (preupload), the
LFS batch API and the upload of each object (its sha256 checked), a commit (ndjson: regular files inline, LFS
files by oid, each checked to be uploaded), the check of a card's metadata (validate-yaml: a YAML mapping whose
model-index huggingface_hub's own parser reads), and `resolve` (HEAD and GET) for a download. Writes need the
token it was given. It keeps every repo's files in memory for the test to read back. The hub's Xet storage is
not spoken here: the client is told HF_HUB_DISABLE_XET=1 and uses the LFS protocol the hub still accepts.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".gguf", ".safetensors", ".png")


class StandInHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}      # repo id -> {path: content}
        self.private: dict[str, bool] = {}
        self.commits: dict[str, list[dict]] = {}           # repo id -> commit headers
        self.lfs: dict[str, bytes] = {}                   # sha256 -> content
        self.validated: list[dict] = []                    # card metadata that passed validate-yaml
        self.requests: list[tuple[str, str]] = []          # (method, path) of every request
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StandInHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict | bytes | None = None, headers: dict | None = None):
                data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if isinstance(body, dict) else
                                 "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._reply(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                hub.requests.append((self.command, self.path))
                found = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not found or found[1] not in hub.repos or found[3] not in hub.repos[found[1]]:
                    return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                content = hub.repos[found[1]][found[3]]
                commit = hub.commits[found[1]][-1]["oid"]
                self._reply(200, content, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'})

            def do_PUT(self):
                hub.requests.append(("PUT", self.path))
                found = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                data = self._body()
                if not found or hashlib.sha256(data).hexdigest() != found[1]:
                    return self._reply(400, {"error": "content does not match its oid"})
                hub.lfs[found[1]] = data
                self._reply(200, {})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                path = self.path.split("?")[0]
                body = self._body()
                if not self._authorized():
                    return
                if path == "/api/validate-yaml":
                    return self._validate(json.loads(body)["content"])
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}"
                    if repo in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    hub.repos[repo], hub.commits[repo] = {}, []
                    hub.private[repo] = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if found := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/[^/]+", path):
                    if found[1] not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "shouldIgnore": False,
                         "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 1_000_000 else "regular"}
                        for f in files]})
                if found := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                    objects = json.loads(body)["objects"]
                    return self._reply(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}} for o in objects]})
                if found := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path):
                    repo = found[1]
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = dict(hub.repos.get(repo, {}))
                    for line in lines[1:]:
                        value = line["value"]
                        if line["key"] == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif line["key"] == "lfsFile":
                            if value["oid"] not in hub.lfs:
                                return self._reply(422, {"error": f"LFS object of {value['path']} was not uploaded"})
                            files[value["path"]] = hub.lfs[value["oid"]]
                    oid = hashlib.sha1(json.dumps(sorted(files)).encode() + body).hexdigest()
                    hub.repos[repo] = files
                    hub.commits[repo].append({**lines[0]["value"], "oid": oid})
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                self._reply(404, {"error": f"the stand-in hub does not answer {path}"})

            def _validate(self, content: str):
                import yaml
                from huggingface_hub import ModelCardData

                found = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                try:
                    metadata = yaml.safe_load(found[1]) if found else None
                    if not isinstance(metadata, dict):
                        raise ValueError("no YAML metadata block at the top of README.md")
                    ModelCardData(**metadata)  # raises on a model-index the hub could not render
                except Exception as exc:  # noqa: BLE001 - answered as the hub does: 400 with the errors
                    return self._reply(400, {"errors": [{"message": str(exc)}]})
                hub.validated.append(metadata)
                self._reply(200, {"warnings": []})

        return Handler
