"""A loopback stand-in of the Hugging Face Hub API (the real Hub cannot be reached in tests).

Serves, for repos added with HubStub.add_file:
  GET  /api/models/{repo}/revision/{rev}            -> {"id", "sha"}  (branch or commit)
  POST /api/models/{repo}/paths-info/{rev}          -> [{"type","path","oid","size","lfs"?}]
       (form `paths=...&expand=true` as huggingface_hub sends it, or a JSON body)
  GET  /api/models/{repo}/tree/{rev}[/{dir}]        -> the same objects for every file
  GET|HEAD /{repo}/resolve/{rev}/{file}             -> the bytes, with Range, ETag,
       X-Repo-Commit, X-Linked-Size / X-Linked-Etag for LFS files
Large files are LFS (lfs.oid = sha256), small ones plain git blobs (no lfs), as on the Hub.

Faults: `stub.fail(path_substring, status, times=1)`; `stub.token = "hf_x"` makes every
request without `Authorization: Bearer hf_x` answer 401; `stub.requests` records
(method, path, authorization) for assertions. Use:

    with serve_hub() as hub:
        commit = hub.add_file("org/repo", "model.gguf", data)
        ... HF_ENDPOINT=hub.url ...
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.httpserver import serve_stub

LFS_THRESHOLD = 1024  # bytes; the Hub's real threshold is 10 MB, tests use small files


@dataclass
class _Repo:
    branches: Dict[str, str] = field(default_factory=dict)  # name -> commit
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: data}


@dataclass
class HubStub:
    url: str = ""
    token: Optional[str] = None
    repos: Dict[str, _Repo] = field(default_factory=dict)
    requests: List[Tuple[str, str, Optional[str]]] = field(default_factory=list)
    faults: List[list] = field(default_factory=list)  # [substring, status, remaining]

    def add_file(self, repo: str, path: str, data: bytes, branch: str = "main", lfs: Optional[bool] = None) -> str:
        """Commit `path` on `branch`; returns the new commit sha."""
        r = self.repos.setdefault(repo, _Repo())
        files = dict(r.commits.get(r.branches.get(branch, ""), {}))
        files[path] = data
        digest = hashlib.sha1(repr(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items())).encode()
                              + repo.encode() + branch.encode() + str(len(r.commits)).encode()).hexdigest()
        r.commits[digest] = files
        r.branches[branch] = digest
        if lfs is False:
            self._no_lfs.add((repo, path))
        elif lfs is True:
            self._force_lfs.add((repo, path))
        return digest

    def fail(self, substring: str, status: int, times: int = 1) -> None:
        self.faults.append([substring, status, times])

    def __post_init__(self):
        self._no_lfs = set()
        self._force_lfs = set()

    # -- model ---------------------------------------------------------------
    def commit_of(self, repo: str, rev: str) -> Optional[str]:
        r = self.repos.get(repo)
        if r is None:
            return None
        if rev in r.commits:
            return rev
        return r.branches.get(rev)

    def is_lfs(self, repo: str, path: str, data: bytes) -> bool:
        if (repo, path) in self._no_lfs:
            return False
        return (repo, path) in self._force_lfs or len(data) >= LFS_THRESHOLD

    def info(self, repo: str, path: str, data: bytes) -> dict:
        item = {"type": "file", "path": path, "size": len(data),
                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if self.is_lfs(repo, path, data):
            item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return item


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: HubStub

    def log_message(self, *args):
        pass

    # -- plumbing ------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Message": message})

    def _gate(self) -> bool:
        stub = self.stub
        auth = self.headers.get("Authorization")
        stub.requests.append((self.command, self.path, auth))
        for fault in stub.faults:
            if fault[2] > 0 and fault[0] in self.path:
                fault[2] -= 1
                self._error(fault[1], f"injected fault {fault[1]}")
                return False
        if stub.token and auth != f"Bearer {stub.token}":
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # -- routes --------------------------------------------------------------
    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)

    def do_POST(self):
        body = self._body()
        if not self._gate():
            return
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        # api/models/{org}/{name}/paths-info/{rev}
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "paths-info":
            repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = json.loads(body or b"{}").get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            commit = self.stub.commit_of(repo, rev)
            if commit is None:
                return self._error(404, f"Revision Not Found for url: {rev}")
            files = self.stub.repos[repo].commits[commit]
            return self._json(200, [self.stub.info(repo, p, files[p]) for p in paths if p in files])
        self._error(404, "Not Found")

    def _route(self, head: bool):
        if not self._gate():
            return
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        stub = self.stub
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
            repo, rev, prefix = f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:])
            commit = stub.commit_of(repo, rev)
            if commit is None:
                return self._error(404, "Repository or revision not found")
            files = stub.repos[repo].commits[commit]
            items = [stub.info(repo, p, d) for p, d in sorted(files.items()) if p.startswith(prefix)]
            return self._json(200, items)
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
            commit = stub.commit_of(repo, rev)
            if commit is None:
                return self._error(404, "Revision Not Found")
            return self._json(200, {"id": repo, "sha": commit})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            commit = stub.commit_of(repo, rev)
            files = stub.repos[repo].commits[commit] if commit else {}
            if path not in files:
                return self._error(404, "Entry not found")
            return self._file(repo, commit, path, files[path], head)
        self._error(404, "Not Found")

    def _file(self, repo: str, commit: str, path: str, data: bytes, head: bool):
        size = len(data)
        etag = '"' + (hashlib.sha256(data).hexdigest() if self.stub.is_lfs(repo, path, data)
                      else hashlib.sha1(data).hexdigest()) + '"'
        headers = {"Content-Type": "application/octet-stream", "ETag": etag, "Accept-Ranges": "bytes",
                   "X-Repo-Commit": commit}
        if self.stub.is_lfs(repo, path, data):
            headers.update({"X-Linked-Size": str(size), "X-Linked-Etag": etag})
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else max(0, size - int(b))
            end = min(int(b), size - 1) if (a and b) else size - 1
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, data[start:end + 1], headers, head)


@contextlib.contextmanager
def serve_hub(token: Optional[str] = None):
    """Run a HubStub on 127.0.0.1; yields it with `.url` set (use as HF_ENDPOINT)."""
    with serve_stub(HubStub(token=token), _Handler, "BoundHubHandler") as stub:
        yield stub
