"""A local stand-in for the Hugging Face Hub, for tests: a real HTTP server that stores repos as plain
folders, so `huggingface_hub` (2.4) can create a repo, upload a folder, list, read and download it without
the network. Run it as `python tests/hub_standin.py --root DIR --port P [--token T]`; it prints
`ready http://127.0.0.1:P` once it listens.

Emulated, with the error headers (`X-Error-Code`) huggingface_hub maps to its exceptions:
  POST /api/repos/create                           409 when the repo exists (so exist_ok works)
  GET  /api/{type}s/{org}/{name}[/revision/{rev}]  repo info: sha, private, siblings
  GET  /api/{type}s/{org}/{name}/tree/{rev}[/dir]  every file below dir, with its git blob oid
  POST /api/{type}s/{org}/{name}/preupload/{rev}   uploadMode "regular" for every file, oid of the file on the repo
  POST /api/{type}s/{org}/{name}/commit/{rev}      NDJSON: header, file (base64), deletedFile, deletedFolder
  POST /api/validate-yaml                          a README's front matter must be a YAML mapping
  HEAD|GET /[{type}s/]{org}/{name}/resolve/{rev}/{path}   ETag, X-Repo-Commit, Content-Length, the bytes
  GET  /_standin/log                               what it saw: requests, bearer tokens, create calls, commits
Writes need `Authorization: Bearer <token>` (401 otherwise; with --token only that token); a private repo is
a 404 RepoNotFound to readers without one. Tokens are only kept in memory, never written under --root.

Not emulated: LFS and xet (every file is "regular"; an lfsFile operation is refused), branches, tags and pull
requests (only `main` and the current commit resolve), history (the repo folder is the latest tree; the
commit id is a hash of it), gated repos, pagination, whoami and everything else the Hub does.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
API = re.compile(rf"^/api/{REPO}(?:/(?P<op>revision|tree|preupload|commit)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")
RESOLVE = re.compile(r"^/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_oid(data: bytes) -> str:
    """The git blob id of `data`, which is what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, root: Path, token: str | None):
        self.root, self.token, self.lock = root, token, threading.Lock()
        self.private: dict[str, bool] = {}
        self.log: dict[str, list] = {"requests": [], "tokens": [], "created": [], "commits": []}

    def folder(self, repo_type: str, repo: str) -> Path:
        return self.root / f"{repo_type}s" / repo

    def files(self, folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def head(self, folder: Path) -> str:
        return hashlib.sha1(json.dumps({k: git_oid(v) for k, v in self.files(folder).items()}).encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args):  # quiet: the test reads /_standin/log instead
        pass

    def reply(self, status: int, body, headers: dict | None = None):
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        self.reply(status, {"error": message}, {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}),
                                                **(headers or {})})

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def authorized(self) -> bool:
        token = self.token()
        return token is not None and (self.hub.token is None or token == self.hub.token)

    def do_HEAD(self):
        self.handle_any()

    do_GET = do_POST = do_HEAD

    def handle_any(self):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub = self.hub
        with hub.lock:
            hub.log["requests"].append([self.command, path])
            if self.token() is not None:
                hub.log["tokens"].append(self.token())
            if path == "/_standin/log":
                return self.reply(200, hub.log)
            writes = self.command == "POST" and path != "/api/validate-yaml"
            if writes and not self.authorized():
                return self.error(401, None, "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self.create(json.loads(body))
            if path == "/api/validate-yaml":
                return self.validate_yaml(json.loads(body)["content"])
            m = API.match(path) or RESOLVE.match(path)
            if not m:
                return self.error(404, None, f"the stand-in does not emulate {self.command} {path}")
            repo_type, repo = m["type"] or "model", m["repo"]
            folder, private = hub.folder(repo_type, repo), hub.private.get(f"{repo_type}s/{repo}", False)
            if not folder.is_dir() or private and not self.authorized():
                return self.error(404, "RepoNotFound", "Repository not found")
            head, rev = hub.head(folder), m["rev"] or "main"
            if rev not in ("main", head):
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if m.re is RESOLVE:
                return self.resolve(folder, m["path"], head)
            op = m["op"] or "revision"
            if op == "revision" and self.command == "GET":
                return self.reply(200, {"id": repo, "sha": head, "private": private,
                                        "siblings": [{"rfilename": f} for f in hub.files(folder)]})
            if op == "tree" and self.command == "GET":
                prefix = (m["path"] or "").strip("/")
                return self.reply(200, [{"type": "file", "path": f, "size": len(data), "oid": git_oid(data)}
                                        for f, data in hub.files(folder).items()
                                        if not prefix or f.startswith(prefix + "/")])
            if op == "preupload" and self.command == "POST":
                files = hub.files(folder)
                return self.reply(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_oid(files[f["path"]]) if f["path"] in files else None}
                    for f in json.loads(body)["files"]], "commitOid": head})
            if op == "commit" and self.command == "POST" and "create_pr" not in query:
                return self.commit(repo_type, repo, folder, body)
            return self.error(400, None, f"the stand-in does not emulate {self.command} {path} {url.query}")

    def create(self, payload: dict):
        repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        repo_type = payload.get("type") or "model"
        self.hub.log["created"].append({"repo_id": repo, "type": repo_type, "visibility": payload.get("visibility")})
        folder = self.hub.folder(repo_type, repo)
        url = f"http://{self.headers['Host']}/{'' if repo_type == 'model' else repo_type + 's/'}{repo}"
        if folder.exists():  # the Hub sends the url with the 409, and create_repo(exist_ok=True) reads it
            return self.reply(409, {"error": "You already created this repo", "url": url})
        folder.mkdir(parents=True)
        (folder / ".gitattributes").write_text("# the Hub's first commit adds this file\n")
        self.hub.private[f"{repo_type}s/{repo}"] = payload.get("visibility") == "private"
        return self.reply(200, {"url": url, "name": repo})

    def validate_yaml(self, content: str):
        m = re.match(r"^---\r?\n(.*?)\r?\n---(\r?\n|$)", content, re.DOTALL)
        try:
            ok = m is None or isinstance(yaml.safe_load(m[1]) or {}, dict)
        except yaml.YAMLError:
            ok = False
        return self.reply(200 if ok else 400, {"errors": [] if ok else [{"message": "invalid YAML metadata"}]})

    def commit(self, repo_type: str, repo: str, folder: Path, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self.error(400, None, "the first NDJSON line must be the header")
        files = self.hub.files(folder)
        for line in lines[1:]:
            key, path = line["key"], line["value"]["path"].strip("/")
            if key == "file":
                files[path] = base64.b64decode(line["value"]["content"])
            elif key == "deletedFile" and path in files:
                del files[path]
            elif key == "deletedFolder":
                files = {f: d for f, d in files.items() if not f.startswith(path + "/")}
            elif key == "deletedFile":
                return self.error(404, "EntryNotFound", f"cannot delete {path}: no such file")
            else:
                return self.error(400, None, f"the stand-in does not emulate {key} operations (LFS, copies)")
        shutil.rmtree(folder)
        for path, data in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        folder.mkdir(parents=True, exist_ok=True)
        head = self.hub.head(folder)
        self.hub.log["commits"].append({"repo_id": repo, "summary": lines[0]["value"].get("summary"), "oid": head,
                                        "operations": [[line["key"], line["value"]["path"]] for line in lines[1:]]})
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return self.reply(200, {"commitUrl": f"http://{self.headers['Host']}/{prefix}{repo}/commit/{head}",
                                "commitOid": head, "pullRequestUrl": None})

    def resolve(self, folder: Path, path: str, head: str):
        file = folder / path
        if not file.is_file() or folder.resolve() not in file.resolve().parents:
            return self.error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": head})
        data = file.read_bytes()
        return self.reply(200, data, {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": head,
                                      "Content-Type": "application/octet-stream"})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="Folder the repos are stored in.")
    ap.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (0: any free port).")
    ap.add_argument("--token", help="Accept only this bearer token (default: any).")
    args = ap.parse_args()
    Handler.hub = Hub(Path(args.root), args.token)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"ready http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
