"""A minimal in-memory Hugging Face Hub for tests: enough of the HTTP protocol for `HfApi.create_repo`,
`create_branch`, `upload_folder` (regular files only), `get_paths_info`, `model_info`, `list_repo_tree` and
`hf_hub_download`, so the unmodified huggingface_hub client can push and load without internet.

Use: `with HubServer() as hub:` then run the client with `HF_ENDPOINT=hub.url`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    private: bool = False

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Runs the fake Hub on 127.0.0.1 in a thread; `requests` logs (method, path) of every request."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def commit(self, repo: Repo, revision: str, changes: dict[str, bytes | None], message: str) -> str:
        parent = repo.resolve(revision)
        files = dict(repo.commits.get(parent, {}))
        for path, content in changes.items():
            if content is None:
                files.pop(path, None)
            else:
                files[path] = content
        sha = hashlib.sha1(f"{parent}\n{message}\n{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = files
        return sha


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def reply(self, status: int, body: object = b"", headers: dict[str, str] | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def miss(self, code: str, message: str) -> None:
            self.reply(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            self.route()

        def do_HEAD(self) -> None:
            self.route()

        def do_POST(self) -> None:
            self.route()

        def route(self) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            with hub.lock:
                hub.requests.append((self.command, url.path))
                if parts[:1] == ["api"]:
                    self.api(parts[1:], parse_qs(url.query))
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                else:
                    self.reply(404, {"error": "not found"})

        def api(self, parts: list[str], query: dict[str, list[str]]) -> None:
            if parts == ["repos", "create"]:
                payload = json.loads(self.body())
                repo_id = f"{payload['organization'] or 'user'}/{payload['name']}"
                if repo_id in hub.repos:
                    return self.reply(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"})
                repo = hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                repo.refs["main"] = hub.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs\n"},
                                               "initial commit")
                return self.reply(200, {"url": f"{hub.url}/{repo_id}"})
            if parts == ["validate-yaml"]:
                content = json.loads(self.body())["content"]
                front = content.split("---")[1] if content.startswith("---") else ""
                try:
                    yaml.safe_load(front)
                except yaml.YAMLError as error:
                    return self.reply(400, {"errors": [{"message": str(error)}]})
                return self.reply(200, {"errors": [], "warnings": []})
            if len(parts) < 3 or parts[0] != "models":
                return self.reply(404, {"error": "not found"})
            repo_id, rest = f"{parts[1]}/{parts[2]}", parts[3:]
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self.miss("RepoNotFound", f"Repository {repo_id} not found")
            action, revision = (rest[0], "/".join(rest[1:2]) or "main") if rest else ("revision", "main")
            if action == "branch":  # POST /api/models/ORG/NAME/branch/BRANCH
                if revision not in repo.refs:
                    repo.refs[revision] = repo.refs["main"]
                return self.reply(200, {})
            sha = repo.resolve(revision)
            if sha is None:
                return self.miss("RevisionNotFound", f"Invalid rev id: {revision}")
            files = repo.commits[sha]
            if action == "preupload":
                paths = [f["path"] for f in json.loads(self.body())["files"]]
                return self.reply(200, {"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False}
                                                  for p in paths], "commitOid": sha})
            if action == "commit":
                return self.commit(repo_id, repo, revision, query)
            if action == "revision":
                return self.reply(200, {"id": repo_id, "sha": sha, "private": repo.private, "tags": [],
                                        "siblings": [{"rfilename": p, "size": len(d), "blobId": blob_id(d)}
                                                     for p, d in sorted(files.items())]})
            if action == "tree":
                prefix = "/".join(rest[2:]).strip("/")
                return self.reply(200, [self.entry(p, d) for p, d in sorted(files.items())
                                        if not prefix or p.startswith(prefix + "/")])
            if action == "paths-info":
                wanted = parse_qs(self.body().decode()).get("paths", [])
                return self.reply(200, [self.entry(p, files[p]) for p in wanted if p in files])
            return self.reply(404, {"error": f"unsupported endpoint {action}"})

        @staticmethod
        def entry(path: str, data: bytes) -> dict[str, object]:
            return {"type": "file", "path": path, "size": len(data), "oid": blob_id(data)}

        def commit(self, repo_id: str, repo: Repo, revision: str, query: dict[str, list[str]]) -> None:
            lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            changes: dict[str, bytes | None] = {}
            for line in lines:
                if line["key"] == "file":
                    changes[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "deletedFile":
                    changes[line["value"]["path"]] = None
                elif line["key"] != "header":
                    return self.reply(400, {"error": f"unsupported commit operation {line['key']}"})
            sha = hub.commit(repo, revision, changes, header["summary"])
            pr_url = None
            if query.get("create_pr") == ["1"]:
                number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
                repo.refs[f"refs/pr/{number}"] = sha
                pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
            else:
                repo.refs[revision] = sha
            self.reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": pr_url})

        def resolve(self, repo_id: str, revision: str, path: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self.miss("RepoNotFound", f"Repository {repo_id} not found")
            sha = repo.resolve(revision)
            if sha is None:
                return self.miss("RevisionNotFound", f"Invalid rev id: {revision}")
            data = repo.commits[sha].get(path)
            if data is None:
                return self.miss("EntryNotFound", f"{path} does not exist on {revision}")
            self.reply(200, data, {"X-Repo-Commit": sha, "ETag": f'"{blob_id(data)}"',
                                   "Content-Type": "application/octet-stream"})

    return Handler
