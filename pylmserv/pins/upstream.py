"""What upstream offers now: GitHub releases, tags and branch heads (REST API), tags of any
git remote (`git ls-remote`), and which tag is the newest (`tag-pattern`).

PYLMSERV_GITHUB_API picks the API (default https://api.github.com; tests use a loopback
stand-in), GITHUB_TOKEN / GH_TOKEN authenticate and are sent to that origin only. Lists
are read page by page (Link: rel="next", same origin only, at most MAX_PAGES). Rate-limit
answers (403/429 with Retry-After or X-RateLimit-Reset) are waited out when the wait is
short (PYLMSERV_RATE_LIMIT_WAIT seconds, default 60) and fail with one clear line when not.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple
from urllib.parse import urljoin, urlsplit

from ..core.errors import NetworkError, UsageError
from ..core.log import get_logger
from ..core.version import __version__
from ..transfer.git import ls_remote
from ..transfer.http import bounded_json, refuse_credentials

log = get_logger("pylmserv.update")

API = "https://api.github.com"
MAX_PAGES = 50
PER_PAGE = 100
RATE_RETRIES = 3
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Tag:
    """A release or tag upstream: name, the commit it points at (when known), its date."""

    name: str
    commit: Optional[str] = None
    date: Optional[str] = None
    prerelease: bool = False


def api_base() -> str:
    return refuse_credentials((os.environ.get("PYLMSERV_GITHUB_API") or API).rstrip("/"), "PYLMSERV_GITHUB_API")


def max_wait() -> float:
    try:
        return max(0.0, float(os.environ.get("PYLMSERV_RATE_LIMIT_WAIT", "60")))
    except ValueError:
        return 60.0


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme)


def _headers(url: str) -> dict:
    headers = {"Accept": "application/vnd.github+json", "User-Agent": f"pylmserv/{__version__}",
               "X-GitHub-Api-Version": "2022-11-28"}
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if token and _origin(url) == _origin(api_base()):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _rate_wait(resp, now: float) -> Optional[float]:
    """Seconds the server asks us to wait, or None when this is not a rate-limit answer."""
    if resp.status_code not in (403, 429):
        return None
    retry_after = resp.headers.get("Retry-After")
    if retry_after is not None:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            return float("inf")  # an HTTP date or garbage: not something to sleep on blindly
    if resp.headers.get("X-RateLimit-Remaining") == "0" or resp.status_code == 429:
        try:
            return max(0.0, float(resp.headers.get("X-RateLimit-Reset", "")) - now)
        except ValueError:
            return float("inf") if resp.status_code == 429 else None
    return None


def _get(url: str, what: str, sleep: Callable[[float], None] = time.sleep):
    import requests

    for attempt in range(RATE_RETRIES + 1):
        try:
            resp = requests.get(url, headers=_headers(url), timeout=(15, 60), allow_redirects=False, stream=True)
        except requests.RequestException as exc:
            raise NetworkError(f"{what}: cannot reach the GitHub API at {api_base()}: {type(exc).__name__}",
                               hint="Check the network, or set PYLMSERV_GITHUB_API to a reachable API.") from None
        wait = _rate_wait(resp, time.time())
        if wait is None:
            break
        limit = max_wait()
        if wait > limit or attempt == RATE_RETRIES:
            until = (time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + wait))
                     if wait != float("inf") else "an unknown time")
            raise NetworkError(f"{what}: the GitHub API rate limit is exhausted until {until} "
                               f"(HTTP {resp.status_code}; waiting that long is over the {limit:.0f} s limit)",
                               hint="Set GITHUB_TOKEN for a higher limit, retry later, or raise "
                                    "PYLMSERV_RATE_LIMIT_WAIT.")
        log.warning("%s: GitHub API rate limit (HTTP %s): waiting %.0f s", what, resp.status_code, wait)
        sleep(wait + 0.5)
    if resp.status_code == 404:
        raise UsageError(f"{what}: not found on the GitHub API ({urlsplit(url).path})",
                         hint="Check owner and repo in pylmserv.toml.")
    if resp.status_code in (401, 403):
        raise NetworkError(f"{what}: the GitHub API refused access (HTTP {resp.status_code})",
                           hint="Set GITHUB_TOKEN to a token that can read this repository.")
    if resp.status_code != 200:
        raise NetworkError(f"{what}: HTTP {resp.status_code} from the GitHub API ({urlsplit(url).path})",
                           hint="Try again later.")
    try:
        return bounded_json(resp, what, f"the GitHub API ({urlsplit(url).path})"), resp
    except ValueError:
        raise NetworkError(f"{what}: the GitHub API did not answer JSON (a proxy page?)",
                           hint="Check PYLMSERV_GITHUB_API and proxy settings.") from None


def _next_link(resp, current: str) -> Optional[str]:
    for part in (resp.headers.get("Link") or "").split(","):
        m = re.match(r'\s*<([^>]*)>\s*;(.*)', part)
        if m and re.search(r'rel="?next"?', m.group(2)):
            return urljoin(current, m.group(1))
    return None


def get_list(path: str, what: str) -> list:
    """Every item of a paginated list endpoint."""
    url = f"{api_base()}{path}{'&' if '?' in path else '?'}per_page={PER_PAGE}"
    items: list = []
    for _ in range(MAX_PAGES):
        data, resp = _get(url, what)
        if not isinstance(data, list):
            raise NetworkError(f"{what}: unexpected answer from the GitHub API (not a list)")
        items.extend(data)
        nxt = _next_link(resp, url)
        if nxt is None:
            return items
        if _origin(nxt) != _origin(api_base()):
            raise NetworkError(f"{what}: the GitHub API sent a next page on another host ({_origin(nxt)[1]})",
                               hint="Check PYLMSERV_GITHUB_API; pylmserv follows pages on the API host only.")
        url = nxt
    raise NetworkError(f"{what}: more than {MAX_PAGES} pages from the GitHub API",
                       hint="Set a tag-pattern that narrows the list, or pin a ref by hand.")


def get_object(path: str, what: str) -> dict:
    data, _ = _get(api_base() + path, what)
    if not isinstance(data, dict):
        raise NetworkError(f"{what}: unexpected answer from the GitHub API (not an object)")
    return data


# -- queries ----------------------------------------------------------------------------

def releases(owner: str, repo: str, what: str) -> List[Tag]:
    """Published releases (drafts dropped), newest first as the API lists them."""
    out = []
    for r in get_list(f"/repos/{owner}/{repo}/releases", what):
        if not isinstance(r, dict) or r.get("draft") or not isinstance(r.get("tag_name"), str):
            continue
        out.append(Tag(r["tag_name"], date=_str(r.get("published_at") or r.get("created_at")),
                       prerelease=bool(r.get("prerelease"))))
    return out


def tags(owner: str, repo: str, what: str) -> List[Tag]:
    out = []
    for t in get_list(f"/repos/{owner}/{repo}/tags", what):
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            commit = (t.get("commit") or {}).get("sha") if isinstance(t.get("commit"), dict) else None
            out.append(Tag(t["name"], commit=commit if isinstance(commit, str) and _SHA.match(commit) else None))
    return out


def commit(owner: str, repo: str, ref: str, what: str) -> Tag:
    """The commit `ref` (branch, tag or sha) names now, with its committer date."""
    data = get_object(f"/repos/{owner}/{repo}/commits/{ref}", what)
    sha = data.get("sha")
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise NetworkError(f"{what}: the GitHub API gave no commit for {ref!r}")
    info = data.get("commit") if isinstance(data.get("commit"), dict) else {}
    committer = info.get("committer") if isinstance(info.get("committer"), dict) else {}
    return Tag(ref, commit=sha, date=_str(committer.get("date")))


def latest_release(owner: str, repo: str, what: str) -> Optional[Tag]:
    return newest(releases(owner, repo, what), None)


def git_tags(url: str) -> List[Tag]:
    """Tags of any git remote, peeled to their commits (`git ls-remote --tags`)."""
    refs = ls_remote(url)
    found = {}
    for name, sha in refs.items():
        if not name.startswith("refs/tags/"):
            continue
        tag = name[len("refs/tags/"):]
        if tag.endswith("^{}"):
            found[tag[:-3]] = sha  # the peeled commit wins over the tag object
        else:
            found.setdefault(tag, sha)
    return [Tag(n, commit=c) for n, c in sorted(found.items())]


# -- ordering ---------------------------------------------------------------------------

def _version_key(text: str) -> Tuple:
    """Natural order: numbers compare as numbers (b9990 > b10000 is false)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|[A-Za-z]+", text))


# Tag names a server may hand us end up in pylmserv.toml, in git commands and in URLs:
# plain names only (git's own rules are looser), never "..", never a leading "-".
SAFE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+/-]{0,127}")


def safe_tag(name: str) -> bool:
    return bool(SAFE_TAG.fullmatch(name)) and ".." not in name and not name.endswith(("/", ".lock"))


def newest(candidates: Sequence[Tag], pattern: Optional[str], prereleases: bool = False) -> Optional[Tag]:
    """The newest tag: those matching `pattern` (whole name), ordered by its groups (or the
    whole name) in natural version order; without a pattern, in version order too, and
    pre-releases are skipped unless asked for. Names that are not plain are skipped."""
    rx = re.compile(pattern) if pattern else None
    best, best_key = None, None
    for tag in candidates:
        if (tag.prerelease and not prereleases) or not safe_tag(tag.name):
            continue
        if rx is not None:
            m = rx.fullmatch(tag.name)
            if m is None:
                continue
            parts = m.groups() or (m.group(0),)
            key = tuple(_version_key(p or "") for p in parts)
        else:
            key = (_version_key(tag.name),)
        if best_key is None or key > best_key:
            best, best_key = tag, key
    return best


def _str(value) -> Optional[str]:
    return value if isinstance(value, str) else None
