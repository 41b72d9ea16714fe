"""A loopback stand-in of the GitHub REST API (api.github.com cannot be reached in tests),
backed by real git repositories: tags and commits are read from the repo with git.

  GET /repos/{o}/{r}/releases        releases added with stub.release(), newest first
  GET /repos/{o}/{r}/tags            the repo's tags, peeled to commits
  GET /repos/{o}/{r}/commits/{ref}   {"sha", "commit": {"committer": {"date"}}}
Lists are paginated like GitHub's (page=, per_page= capped at stub.page_size, a Link
header with rel="next" and rel="last"). Faults: stub.fault(substring, status, headers,
times) answers `status` with `headers` (e.g. a rate limit with X-RateLimit-Reset);
stub.next_host rewrites the host of Link URLs (a hostile server). Use:

    with serve_github() as gh:
        gh.add_repo("owner", "name", Path(repo))
        gh.release("owner", "name", "v1.0")
        ... PYLMSERV_GITHUB_API=gh.url ...
"""
from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.httpserver import serve_stub


@dataclass
class GithubStub:
    url: str = ""
    page_size: int = 2
    repos: Dict[str, Path] = field(default_factory=dict)
    releases: Dict[str, List[dict]] = field(default_factory=dict)
    faults: List[list] = field(default_factory=list)
    requests: List[Tuple[str, Optional[str]]] = field(default_factory=list)
    next_host: Optional[str] = None

    def add_repo(self, owner: str, name: str, repo: Path) -> None:
        self.repos[f"{owner}/{name}"] = Path(repo)
        self.releases.setdefault(f"{owner}/{name}", [])

    def release(self, owner: str, name: str, tag: str, date: str = "2026-01-01T00:00:00Z",
                prerelease: bool = False, draft: bool = False) -> None:
        self.releases[f"{owner}/{name}"].insert(0, {"tag_name": tag, "name": tag, "published_at": date,
                                                   "created_at": date, "prerelease": prerelease,
                                                   "draft": draft})

    def fault(self, substring: str, status: int, headers: Optional[dict] = None, times: int = 1) -> None:
        self.faults.append([substring, status, dict(headers or {}), times])

    def git(self, key: str, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.repos[key]), *args], check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: GithubStub

    def log_message(self, *args):
        pass

    def _send(self, status: int, obj, headers: Optional[dict] = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _page(self, items: list) -> None:
        query = parse_qs(urlsplit(self.path).query)
        per = min(int(query.get("per_page", ["30"])[0]), self.stub.page_size)
        page = int(query.get("page", ["1"])[0])
        chunk = items[(page - 1) * per: page * per]
        last = max(1, -(-len(items) // per))
        headers = {}
        if page < last:
            base = self.stub.next_host or self.stub.url
            path = urlsplit(self.path).path
            headers["Link"] = (f'<{base}{path}?per_page={per}&page={page + 1}>; rel="next", '
                               f'<{base}{path}?per_page={per}&page={last}>; rel="last"')
        self._send(200, chunk, headers)

    def do_GET(self):
        stub = self.stub
        stub.requests.append((self.path, self.headers.get("Authorization")))
        for fault in stub.faults:
            if fault[3] > 0 and fault[0] in self.path:
                fault[3] -= 1
                return self._send(fault[1], {"message": "API rate limit exceeded (stand-in fault)"}, fault[2])
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        if len(parts) < 4 or parts[0] != "repos" or f"{parts[1]}/{parts[2]}" not in stub.repos:
            return self._send(404, {"message": "Not Found"})
        key, what = f"{parts[1]}/{parts[2]}", parts[3]
        if what == "releases" and len(parts) == 4:
            return self._page(stub.releases[key])
        if what == "tags" and len(parts) == 4:
            out = []
            refs = stub.git(key, "for-each-ref", "--sort=-creatordate", "refs/tags",
                            "--format=%(refname:short) %(objectname) %(*objectname)")
            for line in refs.splitlines():
                name, obj, peeled = (line.split() + [""])[:3]
                out.append({"name": name, "commit": {"sha": peeled or obj}})
            return self._page(out)
        if what == "commits" and len(parts) >= 5:
            ref = "/".join(parts[4:])
            try:
                sha = stub.git(key, "rev-parse", "--verify", f"{ref}^{{commit}}")
            except subprocess.CalledProcessError:
                return self._send(422, {"message": f"No commit found for SHA: {ref}"})
            date = stub.git(key, "log", "-1", "--format=%cI", sha)
            return self._send(200, {"sha": sha, "commit": {"committer": {"date": date}}})
        self._send(404, {"message": "Not Found"})


@contextlib.contextmanager
def serve_github():
    """Run a GithubStub on 127.0.0.1; yields it with `.url` set (use as PYLMSERV_GITHUB_API)."""
    with serve_stub(GithubStub(), _Handler, "BoundGithubHandler") as stub:
        yield stub
