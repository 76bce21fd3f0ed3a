"""Servers on 127.0.0.1 that the tests start: a stand-in for the Hugging Face Hub's HTTP API and a plain
file server that can misbehave (wrong bytes, a connection cut mid-file, no answer at all).

The Hub stand-in answers the four requests `huggingface_hub` makes to resolve and download a model
(model info, the recursive file tree, and HEAD / GET of `resolve/`), with the headers its downloader reads
(`X-Repo-Commit`, `ETag`, `Content-Length`), so the library's real download code writes its real cache layout.
It records every file it served, so a test can check what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlparse


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def serving(handler_class):
    """Run `handler_class` on a free port of 127.0.0.1; yields the base URL."""
    server = _Server(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _HubHandler(BaseHTTPRequestHandler):
    """The Hub's answers for one `FakeHub` (the class attribute `hub`, set by `FakeHub.running`)."""

    hub: "FakeHub"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _json(self, value, status=200):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self, kind="Repo"):
        body = json.dumps({"error": f"{kind} not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound" if kind == "Repo" else "EntryNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, head: bool):
        path = unquote(urlparse(self.path).path).strip("/").split("/")
        if path[:2] in (["api", "models"], ["api", "datasets"]):
            return self._api(path[1][:-1], path[2:])
        repo_type = "model"
        if path[:1] == ["datasets"]:
            repo_type, path = "dataset", path[1:]
        # /[datasets/]{org}/{name}/resolve/{revision}/{file...}
        if len(path) >= 5 and path[2] == "resolve":
            repo_id = "/".join(path[:2])
            if (repo_type, repo_id) not in self.hub.repos:
                return self._not_found()
            commit, files = self.hub.repos[(repo_type, repo_id)]
            name = "/".join(path[4:])
            if name not in files:
                return self._not_found("Entry")
            data = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.hub.served.append(f"{repo_id}/{name}")
                self.wfile.write(data)
            return None
        self.hub.unanswered.append(self.path)
        return self._not_found()

    def _api(self, repo_type: str, rest: list[str]):
        repo_id = "/".join(rest[:2])
        if (repo_type, repo_id) not in self.hub.repos:
            return self._not_found()
        commit, files = self.hub.repos[(repo_type, repo_id)]
        if len(rest) >= 4 and rest[2] == "tree":  # the whole tree, or one folder of it
            prefix = "/".join(rest[4:])
            recursive = "recursive=true" in self.path.lower() or "recursive=1" in self.path
            entries, folders = [], set()
            for p, d in sorted(files.items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rel = p[len(prefix) + 1:] if prefix else p
                if "/" in rel and not recursive:
                    folders.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                    continue
                entries.append({"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()})
            if recursive:
                for p in files:
                    parts = p.split("/")[:-1]
                    folders.update("/".join(parts[:k]) for k in range(1, len(parts) + 1)
                                   if "/".join(parts[:k]).startswith(prefix))
            entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)
                        if f != prefix]
            return self._json(entries)
        if len(rest) >= 3 and rest[2] not in ("revision",):
            self.hub.unanswered.append(self.path)
            return self._not_found("Entry")
        return self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                           "siblings": [{"rfilename": p} for p in sorted(files)],
                           "lastModified": "2026-12-01T00:00:00.000Z", "cardData": {}, "tags": []})


class FakeHub:
    """Repositories held in memory: `add(repo_id, {path: bytes})` makes one commit of them (a model
    repository, or a dataset repository with `repo_type="dataset"`)."""

    def __init__(self):
        self.repos: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}
        self.served: list[str] = []  # "repo_id/path" of every GET of a file
        self.unanswered: list[str] = []  # requests this stand-in does not know (404)

    def add(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> str:
        commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                              .encode() + repo_id.encode()).hexdigest()
        self.repos[(repo_type, repo_id)] = (commit, dict(files))
        return commit

    @contextmanager
    def running(self):
        handler = type("HubHandler", (_HubHandler,), {"hub": self})
        with serving(handler) as url:
            yield url


class FileServer:
    """Files by URL path, each served as "ok", "cut" (Content-Length of the whole, half the bytes, then the
    connection closes) or "stall" (the request is read and never answered)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()

    def add(self, path: str, data: bytes, mode: str = "ok") -> None:
        self.files["/" + path.lstrip("/")] = (data, mode)

    @contextmanager
    def running(self):
        files = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                files.requests.append(self.path)
                entry: Optional[tuple[bytes, str]] = files.files.get(self.path)
                if entry is None:
                    self.send_error(404)
                    return
                data, mode = entry
                if mode == "stall":
                    files.release.wait(60)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        try:
            with serving(Handler) as url:
                yield url
        finally:
            self.release.set()
