"""A Hugging Face Hub look-alike on loopback: repos served from local folders, with injectable faults.

Tests point the real huggingface_hub client at it (``HF_ENDPOINT=<server.url>``), so what is exercised
is the client meshload ships with, over real HTTP. It answers what that client asks (read from
huggingface_hub 2.4's ``hf_api.py``/``file_download.py``):

- ``GET /api/models/{repo}[/revision/{rev}]``: model info with the commit ``sha`` (``resolve_revision``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing, LFS ``oid``/``size`` included;
- ``POST /api/models/{repo}/paths-info/{rev}``: the same for named paths;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: small files answered directly (``ETag`` = git blob
  sha1); LFS files (``*.safetensors``, ``*.bin``) redirected with 302 to a second, "CDN" origin,
  with ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size`` on the redirect, as the Hub
  does; errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``);
- ``HEAD``/``GET /lfs/{sha256}`` on the CDN origin: the bytes, with ``Range`` (206 + ``Content-Range``),
  ``Accept-Ranges``, ``Content-Length`` and ``ETag``.

Every request is logged with the body bytes actually sent (and its Authorization header), so tests can
assert what was downloaded, and with which token.
Faults (``Fault``): an HTTP status (500...), a body cut short (the connection drops), a slow response,
a corrupt body of the right length. ``latency_s``/``bandwidth`` throttle responses (benchmarks). Lies
(``HubServer.lie``): a hostile or broken endpoint's answers — a commit that is a path, an LFS sha256
that is not one. ``add_repo(..., lfs=False)`` serves a repo whose files are all kept in git.

Runs in the test process, on 127.0.0.1; Ray workers of simulated nodes (127.0.0.2+) reach it there.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CHUNK = 64 << 10


@dataclass(frozen=True, slots=True)
class HubFile:
    name: str
    path: str
    size: int
    git_sha1: str
    sha256: str
    lfs: bool


@dataclass
class HubRepo:
    repo_id: str
    folder: str
    commit: str
    files: dict[str, HubFile]
    lies: dict = field(default_factory=dict)  # what a hostile endpoint answers instead (``HubServer.lie``)


@dataclass
class Fault:
    """Make requests whose path contains ``match`` misbehave, ``times`` times (-1: always).

    kind: ``"status"`` (answer ``status``), ``"cut"`` (send ``after`` body bytes, then drop the
    connection), ``"slow"`` (wait ``delay_s`` before answering), ``"corrupt"`` (flip the body's bytes,
    same length). ``origin``: ``"hub"``, ``"cdn"`` or ``"any"``; ``methods``: which HTTP methods;
    ``range_prefix``: only requests whose ``Range`` header starts with it (``"bytes=0-"``).
    """

    match: str
    kind: str
    times: int = 1
    status: int = 500
    after: int = 0
    delay_s: float = 0.0
    origin: str = "any"
    methods: tuple[str, ...] = ("GET",)
    range_prefix: str | None = None
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("status", "cut", "slow", "corrupt"):
            raise ValueError(f"unknown fault kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Served:
    origin: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted
    range: str | None
    status: int
    nbytes: int  # body bytes actually sent
    fault: str | None = None
    authorization: str | None = None  # the request's Authorization header (which token reached the server)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → half-open (start, stop); None: no usable range."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes="):].partition("-")
    if first == "":
        n = int(last)
        return (max(size - n, 0), size)
    start = int(first)
    stop = min(int(last) + 1, size) if last else size
    return (start, stop)


@dataclass
class HubServer:
    latency_s: float = 0.0  # added before every response
    bandwidth: float | None = None  # bytes/s per response body
    repos: dict[str, HubRepo] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    log: list[Served] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""

    # -- set-up ------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str, *, lfs: bool = True) -> str:
        """Serve every file under ``folder`` as repo ``repo_id`` (one commit, also reachable as ``main``);
        ``lfs=False``: every file kept in git (no LFS metadata, served by the Hub origin itself)."""
        files = {}
        for base, _, names in os.walk(folder):
            for n in names:
                path = os.path.join(base, n)
                name = os.path.relpath(path, folder).replace(os.sep, "/")
                with open(path, "rb") as f:
                    data = f.read()
                files[name] = HubFile(
                    name=name, path=path, size=len(data), git_sha1=git_blob_sha1(data),
                    sha256=hashlib.sha256(data).hexdigest(), lfs=lfs and name.endswith(LFS_SUFFIXES),
                )
        commit = hashlib.sha1(
            (repo_id + "".join(f"{n}:{f.git_sha1}" for n, f in sorted(files.items()))).encode()
        ).hexdigest()
        self.repos[repo_id] = HubRepo(repo_id, folder, commit, files)
        return commit

    def lie(self, repo_id: str, **answers) -> None:
        """Answer like a hostile or broken endpoint for ``repo_id``: ``commit=`` (the commit of every revision,
        in model info and ``X-Repo-Commit``), ``sha256={file: value}`` (LFS oids in listings and the
        ``X-Linked-Etag`` of resolve answers), ``content={file: path}`` (the bytes of another file served
        for it). ``lie(repo_id)`` tells the truth again."""
        self.repos[repo_id].lies = dict(answers)

    def lfs_path(self, repo_id: str, name: str) -> str:
        """The CDN path serving an LFS file's bytes (what a fault on its download must match)."""
        return f"/lfs/{self.repos[repo_id].files[name].sha256}"

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    def served(self, pred=None) -> list[Served]:
        with self._lock:
            return [s for s in self.log if pred is None or pred(s)]

    def bytes_served(self, pred=None) -> int:
        return sum(s.nbytes for s in self.served(pred))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        for origin in ("hub", "cdn"):
            handler = type(f"{origin.title()}Handler", (_Handler,), {"hub": self, "origin": origin})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, name=f"hub-server-{origin}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------
    def _fault_for(self, origin: str, method: str, path: str, range_header: str | None) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times != -1 and f.hits >= f.times:
                    continue
                if f.origin not in ("any", origin) or method not in f.methods or f.match not in path:
                    continue
                if f.range_prefix is not None and not (range_header or "").startswith(f.range_prefix):
                    continue
                f.hits += 1
                return f
        return None

    def _record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def _blob(self, sha256: str) -> HubFile | None:
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha256:
                    return f
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer
    origin: str

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        self._body_in = b""
        if method == "POST":
            self._body_in = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._served = {"method": method, "path": path, "range": self.headers.get("Range"), "fault": None,
                        "authorization": self.headers.get("Authorization")}
        if self.hub.latency_s:
            time.sleep(self.hub.latency_s)
        fault = self.hub._fault_for(self.origin, method, path, self.headers.get("Range"))
        self._fault = fault
        try:
            if fault is not None:
                self._served["fault"] = fault.kind
                if fault.kind == "status":
                    return self._error(fault.status, "InjectedFault", f"injected HTTP {fault.status}")
                if fault.kind == "slow":
                    time.sleep(fault.delay_s)
            if self.origin == "cdn":
                return self._cdn(method, path)
            return self._hub(method, path, split.query)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = 0
        head = head or self._served["method"] == "HEAD"
        if not head and body:
            sent = self._write_body(body)
        self.hub._record(Served(self.origin, status=status, nbytes=sent, **self._served))

    def _write_body(self, body: bytes) -> int:
        fault = self._fault
        if fault is not None and fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        limit = len(body)
        if fault is not None and fault.kind == "cut":
            limit = min(fault.after, len(body))
        sent = 0
        while sent < limit:
            piece = body[sent : min(limit, sent + CHUNK)]
            self.wfile.write(piece)
            sent += len(piece)
            if self.hub.bandwidth:
                time.sleep(len(piece) / self.hub.bandwidth)
        self.wfile.flush()
        if limit < len(body):  # cut: drop the connection mid-body
            self.close_connection = True
            try:
                import socket

                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return sent

    def _json(self, status: int, data, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(status, {"Content-Type": "application/json", **(extra or {})}, body)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})})

    # -- the Hub origin --------------------------------------------------------------------------------
    def _repo(self, org: str, name: str) -> HubRepo | None:
        return self.hub.repos.get(f"{org}/{name}")

    def _check_rev(self, repo: HubRepo, rev: str) -> bool:
        return rev in ("main", repo.commit)

    def _entry(self, repo: HubRepo, f: HubFile) -> dict:
        e = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": f.name}
        if f.lfs:
            e["lfs"] = {"oid": repo.lies.get("sha256", {}).get(f.name, f.sha256), "size": f.size, "pointerSize": 134}
        return e

    def _hub(self, method: str, path: str, query: str) -> None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._repo(parts[2], parts[3])
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            rest = parts[4:]
            rev = rest[1] if len(rest) >= 2 else "main"
            if rest and not self._check_rev(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if not rest or rest[0] == "revision":
                siblings = [{"rfilename": n} for n in sorted(repo.files)]
                sha = repo.lies.get("commit", repo.commit)
                return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": False, "siblings": siblings})
            if rest[0] == "tree" and method == "GET":
                prefix = "/".join(rest[2:])
                recursive = parse_qs(query).get("recursive", ["false"])[0].lower() == "true"
                out = []
                for n, f in sorted(repo.files.items()):
                    rel = n[len(prefix) + 1 :] if prefix else n
                    if prefix and not n.startswith(prefix + "/"):
                        continue
                    if "/" in rel and not recursive:
                        continue
                    out.append(self._entry(repo, f))
                return self._json(200, out)
            if rest[0] == "paths-info" and method == "POST":
                wanted = parse_qs(self._body_in.decode()).get("paths", [])
                return self._json(200, [self._entry(repo, repo.files[p]) for p in wanted if p in repo.files])
            return self._error(404, "NotFound", f"no route {path}")
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("HEAD", "GET"):
            repo = self._repo(parts[0], parts[1])
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found")
            rev, name = parts[3], "/".join(parts[4:])
            if not self._check_rev(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            f = repo.files.get(name)
            if f is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": repo.commit})
            commit = repo.lies.get("commit", repo.commit)
            if f.lfs:
                headers = {
                    "Location": f"{self.hub.cdn_url}/lfs/{f.sha256}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{repo.lies.get("sha256", {}).get(f.name, f.sha256)}"',
                    "X-Linked-Size": str(f.size),
                    "ETag": f'"{git_blob_sha1(f.sha256.encode())}"',
                }
                return self._send(302, headers, head=method == "HEAD")
            return self._file(method, f, {"X-Repo-Commit": commit, "ETag": f'"{f.git_sha1}"'})
        return self._error(404, "NotFound", f"no route {path}")

    # -- the CDN origin --------------------------------------------------------------------------------
    def _cdn(self, method: str, path: str) -> None:
        parts = path.strip("/").split("/")
        f = self.hub._blob(parts[1]) if len(parts) == 2 and parts[0] == "lfs" else None
        if f is None or method not in ("HEAD", "GET"):
            return self._send(404, {"Content-Type": "text/plain"}, b"not found")
        return self._file(method, f, {"ETag": f'"{f.sha256}"'})

    def _file(self, method: str, f: HubFile, headers: dict[str, str]) -> None:
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        rng = _range(self.headers.get("Range"), f.size)
        path = next((r.lies["content"][f.name] for r in self.hub.repos.values()
                     if f in r.files.values() and f.name in r.lies.get("content", {})), f.path)
        with open(path, "rb") as fh:
            if rng is None:
                body = fh.read() if method == "GET" else b""
                if method == "HEAD":
                    return self._send(200, {**headers, "Content-Length": str(f.size)}, head=True)
                return self._send(200, headers, body)
            start, stop = rng
            if start >= f.size or start >= stop:
                return self._send(416, {**headers, "Content-Range": f"bytes */{f.size}"})
            fh.seek(start)
            body = fh.read(stop - start)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{f.size}"
        if method == "HEAD":
            return self._send(206, {**headers, "Content-Length": str(stop - start)}, head=True)
        return self._send(206, headers, body)
