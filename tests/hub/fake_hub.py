"""A local Hugging Face Hub on 127.0.0.1 for the tests: the parts of the HTTP API rlvr_ray.hub
uses, spoken to the real huggingface_hub client (HF_ENDPOINT=http://127.0.0.1:PORT).

Endpoints (as huggingface_hub 2.4 calls them):
  GET  /api/models?filter=..&sort=createdAt&limit=..&expand=..  listing (every filter must be
       a tag of the model; sorted descending by the sort key)
  GET  /api/models/{repo}[/revision/{rev}]                       model info (sha, siblings, ...)
  GET  /api/models/{repo}/tree/{rev}?recursive=..                file list (snapshot_download)
  HEAD/GET /{repo}/resolve/{rev}/{path}                          file (X-Repo-Commit, ETag,
       Content-Length, Accept-Ranges; Range -> 206 + Content-Range)
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub does.

Fault injection: ``fail(pattern, status, times)`` answers matching requests with ``status``;
``cut(pattern, times, after)`` sends the headers and ``after`` bytes of a matching download, then
closes the connection (``ranged=True``: of a closed range request of more than ``longer_than``
bytes instead). Every request is logged in ``requests`` (method, path, headers), and every file
body sent in ``served`` (repo, file, first byte, bytes sent, whether a Range was asked); with
``who`` (a function of the client's and the server's port), also in ``served_by`` with whom
``who`` says each connection belongs to (first entry).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


class _Server(ThreadingHTTPServer):
    """A client hanging up mid-response (the tests cut connections on purpose, and a reader
    that got what it needed closes) is not an error of the server: no traceback for it."""

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    tags: list[str]
    created: datetime
    card: dict = field(default_factory=dict)

    @functools.cached_property  # a repo's files never change: a new commit is a new Repo
    def sha(self) -> str:
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha1(self.files[name]).digest())
        return h.hexdigest()

    @functools.cached_property
    def sha256(self) -> dict[str, str]:
        """file -> the sha256 of its bytes (the Hub's ETag and LFS oid of a weights file)."""
        return {n: hashlib.sha256(b).hexdigest() for n, b in self.files.items()}

    @functools.cached_property
    def blob_ids(self) -> dict[str, str]:
        return {n: hashlib.sha1(b).hexdigest() for n, b in self.files.items()}


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


class FakeHub:
    """The server's state; ``publish`` adds or updates a repo (a new commit)."""

    def __init__(self, who: Callable[[int, int], object] | None = None):
        self.who = who
        self.served_by: list[tuple[object, str, str, int, int, bool]] = []
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.raw: list[str] = []  # request targets as sent, query string included
        self.faults: list[list] = []  # [regex, kind, status/after, times left, longer_than]
        self.served: list[tuple[str, str, int, int, bool]] = []
        self.lock = threading.Lock()
        self._n = 0
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def publish(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        tags=(),
        base: str | None = None,
        card: dict | None = None,
    ) -> Repo:
        """Publish a repo (from a directory or name -> bytes); later ones are newer."""
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        tags = list(tags)
        if base:
            tags += [f"base_model:{base}", f"base_model:finetune:{base}"]
        with self.lock:
            self._n += 1
            repo = Repo(repo_id, dict(files), tags, T0 + timedelta(hours=self._n), card or {})
            self.repos[repo_id] = repo
        return repo

    def fail(self, pattern: str, status: int = 503, times: int = 1) -> None:
        self.faults.append([re.compile(pattern), "status", status, times, -1])

    def cut(
        self,
        pattern: str,
        times: int = 1,
        after: int = 100,
        ranged: bool = False,
        longer_than: int = 4096,
    ) -> None:
        kind = "cut-range" if ranged else "cut"
        self.faults.append([re.compile(pattern), kind, after, times, longer_than if ranged else -1])

    def fault(self, method: str, path: str, kinds=("status", "cut"), length: int = 0):
        with self.lock:
            for f in self.faults:
                hit = f[1] in kinds and f[0].search(f"{method} {path}") and length > f[4]
                if f[3] > 0 and hit:
                    f[3] -= 1
                    return f[1], f[2]
        return None

    def bytes_served(self, pattern: str = "", ranged: bool | None = None) -> int:
        """Body bytes sent for files whose "repo/file" matches ``pattern``."""
        rx = re.compile(pattern)
        served = list(self.served)
        return sum(
            n for repo, f, _, n, r in served if rx.search(f"{repo}/{f}") and ranged in (None, r)
        )

    def hits(self, pattern: str) -> list[tuple[str, str, dict]]:
        rx = re.compile(pattern)
        return [r for r in self.requests if rx.search(f"{r[0]} {r[1]}")]


def _sibling(repo: Repo, name: str, blobs: bool) -> dict:
    """A file as the Hub lists it; with ``blobs``, its size and (weights in LFS) sha256."""
    if not blobs:
        return {"rfilename": name}
    size = len(repo.files[name])
    out = {"rfilename": name, "size": size, "blobId": repo.blob_ids[name]}
    if name.endswith(".safetensors"):
        out["lfs"] = {"size": size, "sha256": repo.sha256[name], "pointerSize": 134}
    return out


def _info(repo: Repo, expand: list[str] | None = None, blobs: bool = False) -> dict:
    full = {
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "sha": repo.sha,
        "private": False,
        "createdAt": _iso(repo.created),
        "lastModified": _iso(repo.created),
        "tags": repo.tags,
        "cardData": repo.card or None,
        "library_name": "transformers",
        "siblings": [_sibling(repo, n, blobs) for n in sorted(repo.files)],
    }
    if expand:
        return {"id": repo.repo_id, "_id": repo.repo_id} | {k: full[k] for k in expand if k in full}
    return full


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_GET(self):
            self._dispatch("GET")

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.requests.append((method, path, dict(self.headers)))
            hub.raw.append(self.path)
            f = hub.fault(method, path, kinds=("status",))
            if f:
                return self._json({"error": "injected"}, f[1], method)
            q = parse_qs(url.query)
            if path == "/api/models":
                return self._list(q, method)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                repo = self._repo(m[1], m[2], method)
                blobs = q.get("blobs", [""])[0].lower() == "true"
                return repo and self._json(_info(repo, q.get("expand"), blobs), 200, method)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
            if m:
                repo = self._repo(m[1], m[2], method)
                tree = (
                    [
                        {"type": "file", "path": n, "size": len(b), "oid": repo.blob_ids[n]}
                        for n, b in sorted(repo.files.items())
                    ]
                    if repo
                    else None
                )
                return tree is not None and self._json(tree, 200, method)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._file(m[1], m[2], m[3], method)
            self._json({"error": "not found"}, 404, method)

        def _repo(self, repo_id: str, rev: str | None, method: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._json({"error": "Repository not found"}, 404, method, code="RepoNotFound")
                return None
            if rev not in (None, "main", repo.sha):
                self._json({"error": "Invalid rev"}, 404, method, code="RevisionNotFound")
                return None
            return repo

        def _list(self, q: dict, method: str) -> None:
            filters = q.get("filter", [])
            found = [r for r in hub.repos.values() if all(f in r.tags for f in filters)]
            key = {"createdAt": "created", "lastModified": "created"}.get(q.get("sort", [""])[0])
            if key:
                found.sort(key=lambda r: getattr(r, key), reverse=True)
            if "limit" in q:
                found = found[: int(q["limit"][0])]
            self._json([_info(r, q.get("expand")) for r in found], 200, method)

        def _file(self, repo_id: str, rev: str, name: str, method: str) -> None:
            repo = self._repo(repo_id, rev, method)
            if repo is None:
                return
            if name not in repo.files:
                return self._json(
                    {"error": "Entry not found"},
                    404,
                    method,
                    code="EntryNotFound",
                    extra={"X-Repo-Commit": repo.sha},
                )
            body = repo.files[name]
            start, end, status = 0, len(body), 200
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if rng:
                start = int(rng[1])
                end = min(int(rng[2]) + 1, len(body)) if rng[2] else len(body)
                status = 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{repo.sha256[name]}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            self.end_headers()
            if method == "HEAD":
                return
            # cuts hit whole-file downloads and their resumes (open ranges), not header reads;
            # ranged cuts hit closed ranges (a tensor's bytes) longer than their threshold
            kind = "cut-range" if rng and rng[2] else "cut"
            where = f"/{repo_id}/resolve/{rev}/{name}"
            cut = hub.fault(method, where, kinds=(kind,), length=end - start)
            if cut:  # send part of the body, then drop the connection
                part = body[start : min(start + cut[1], end)]
                self._sent(repo_id, name, start, len(part), bool(rng))
                self.wfile.write(part)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._sent(repo_id, name, start, end - start, bool(rng))
            self.wfile.write(body[start:end])

        def _sent(self, repo_id: str, name: str, start: int, n: int, ranged: bool) -> None:
            hub.served.append((repo_id, name, start, n, ranged))
            if hub.who is not None:
                if not hasattr(self, "peer"):  # one handler per connection: look it up once
                    port = self.server.server_address[1]
                    self.peer = hub.who(self.client_address[1], port)
                hub.served_by.append((self.peer, repo_id, name, start, n, ranged))

        def _json(
            self, obj, status: int, method: str, code: str | None = None, extra: dict | None = None
        ) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code:
                self.send_header("X-Error-Code", code)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

    return Handler


def publish_family(hub: FakeHub, family, wide) -> None:
    """org/base and its fine-tunes: two RL ones, an SFT one, a pickle-only and a misfit."""
    hub.publish("org/base", family.base)
    hub.publish("lab/q-grpo", family.runs["grpo"], tags=["trl", "grpo"], base="org/base")
    hub.publish("lab/q-sft", family.runs["sft"], tags=["trl", "sft"], base="org/base")
    hub.publish("lab/q-dapo", family.runs["dapo"], base="org/base", card={"tags": ["dapo"]})
    hub.publish(
        "lab/q-pickle",
        {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04K\x01."},
        tags=["grpo"],
        base="org/base",
    )
    hub.publish("lab/q-wide-grpo", wide, tags=["grpo"], base="org/base")
    hub.publish("other/unrelated-grpo", family.runs["late"], tags=["grpo"], base="other/base")
