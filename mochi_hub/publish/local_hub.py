"""A Hub-compatible HTTP endpoint on 127.0.0.1, to try `mochi push` (and timm's `hf-hub:` loader) with no account and
no network; the tests push to it with the REAL huggingface_hub client. Start it, then point HF_ENDPOINT at it:

    python -m mochi_hub.publish.local_hub --port 8080        # prints the HF_ENDPOINT and HF_TOKEN to export

Repositories live in memory and go when it stops. It implements what huggingface_hub's create_repo / whoami /
create_commit / create_branch / create_tag / list_repo_tree / get_paths_info / model_info / list_repo_refs and
hf_hub_download call:

    GET  /api/whoami-v2                                       token check (401 without a valid token)
    POST /api/repos/create                                    403 outside the token's namespaces, 409 if it exists
    POST /api/validate-yaml                                   the card's YAML header (and its model-index)
    GET  /api/models/{repo}[/revision/{rev}]                  repo info with siblings
    POST /api/models/{repo}/preupload/{rev}                   uploadMode "regular" for every file: no LFS/Xet
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]        NDJSON, applied atomically (all lines or none)
    POST /api/models/{repo}/branch/{branch}, /tag/{rev}       refs
    GET  /api/models/{repo}/refs, /tree/{rev}[/{path}]         listings
    POST /api/models/{repo}/paths-info/{rev}
    HEAD|GET /{repo}/resolve/{rev}/{path}                     ETag, X-Repo-Commit, Content-Length (+ Range)

Deliberately not covered: Git LFS and Xet uploads (an `lfsFile` commit line is refused), gated repos,
fine-grained token scopes, rate limits, pagination of long listings, CDN redirects.

Tokens map to a user and the namespaces it may write; anonymous reads see public repos. For tests: `fail_commit`
makes the next commit request drop the connection after reading its body, as an endpoint dying mid-push would;
`requests` logs every request, so a test can assert that nothing was sent.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pkl filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """What the Hub (and huggingface_hub's `_local_oid` for regular files) calls a file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, str] = field(default_factory=dict)  # PR number -> head commit

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision.startswith("refs/heads/") and revision[11:] in self.branches:
            return self.commits[self.branches[revision[11:]]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        if revision.startswith("refs/pr/") and revision[8:].isdigit() and int(revision[8:]) in self.pulls:
            return self.commits[self.pulls[int(revision[8:])]]
        return self.commits.get(revision)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    def __init__(self, tokens: dict[str, dict]):
        """tokens: {token: {"user": name, "write": [namespaces or repo ids]}}."""
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commit = False
        self.lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --------------------------------------------------------------------------------- lifecycle
    def start(self, port: int = 0) -> LocalHub:
        """Serve in a background thread on 127.0.0.1 (`port` 0: any free one; `url` says which)."""
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------------------------ state
    def _new_oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}:{time.time_ns()}".encode()).hexdigest()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision ({} when the repo or revision does not exist)."""
        with self.lock:
            repo = self.repos.get(repo_id)
            commit = repo.resolve(revision) if repo else None
            return dict(commit.files) if commit else {}

    def user(self, token: str | None) -> dict | None:
        return self.tokens.get(token) if token else None

    def can_write(self, token: str | None, repo_id: str) -> bool:
        user = self.user(token)
        return bool(user) and (repo_id.split("/")[0] in user["write"] or repo_id in user["write"])

    def can_read(self, token: str | None, repo: Repo) -> bool:
        return not repo.private or self.can_write(token, repo.repo_id)


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # -------------------------------------------------------------------------------- plumbing
    def _token(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict | None = None,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _error(self, error: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers=headers, head=head)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with hub.lock:
            hub.requests.append((method, url.path))
        try:
            if segments[:2] == ["api", "whoami-v2"]:
                return self._whoami()
            if segments[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo()
            if segments[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(segments) >= 4 and segments[:2] == ["api", "models"]:
                repo_id, rest = f"{segments[2]}/{segments[3]}", segments[4:]
                return self._api_repo(method, repo_id, rest, query)
            if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(
                    f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]), head=method == "HEAD"
                )
            raise HubError(404, f"no route for {method} {url.path}")
        except HubError as error:
            self._error(error, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ---------------------------------------------------------------------------------- routes
    def _whoami(self) -> None:
        user = self.hub.user(self._token())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            200,
            {
                "type": "user",
                "name": user["user"],
                "fullname": user["user"],
                "orgs": [{"name": ns} for ns in user["write"] if ns != user["user"]],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _create_repo(self) -> None:
        hub, token = self.hub, self._token()
        payload = json.loads(self._body() or b"{}")
        user = hub.user(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "this test endpoint only hosts model repos")
        namespace = payload.get("organization") or user["user"]
        repo_id = f"{namespace}/{payload['name']}"
        if not hub.can_write(token, repo_id):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        with hub.lock:
            if repo_id in hub.repos:
                self._json(
                    409,
                    {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                    headers={"X-Error-Message": "You already created this model repo"},
                )
                return
            private = payload.get("private") or payload.get("visibility") == "private"
            repo = Repo(repo_id, bool(private))
            oid = hub._new_oid(repo_id)
            repo.commits[oid] = Commit(oid, None, {".gitattributes": GITATTRIBUTES}, "initial commit")
            repo.branches["main"] = oid
            hub.repos[repo_id] = repo
        self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        errors = []
        if content.startswith("---\n") and "\n---" in content[3:]:
            try:
                meta = yaml.safe_load(content[4 : content.index("\n---", 3)])
            except yaml.YAMLError as error:
                meta, errors = None, [{"message": f"invalid YAML: {error}"}]
            if not errors and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
            for entry in (meta or {}).get("model-index", []) if not errors else []:
                if "name" not in entry:
                    errors.append({"message": '"model-index[0].name" is required'})
                for result in entry.get("results", []):
                    if "type" not in result.get("task", {}):
                        errors.append({"message": '"model-index[0].results[].task.type" is required'})
                    if not {"name", "type"} <= set(result.get("dataset", {})):
                        errors.append({"message": '"model-index[0].results[].dataset" needs name and type'})
                    for metric in result.get("metrics", []):
                        if not {"type", "value"} <= set(metric):
                            errors.append({"message": '"metrics[]" need type and value'})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        hub, token = self.hub, self._token()
        if token is not None and hub.user(token) is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo = hub.repos.get(repo_id)
        if repo is None or not hub.can_read(token, repo):
            if write and token is not None and not hub.can_write(token, repo_id):
                raise HubError(403, f"You don't have write access to {repo_id}")
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if write and not hub.can_write(token, repo_id):
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    def _api_repo(self, method: str, repo_id: str, rest: list[str], query: dict) -> None:
        hub = self.hub
        if method == "GET" and (not rest or rest[0] == "revision"):
            with hub.lock:
                repo = self._repo(repo_id)
                commit = self._commit(repo, rest[1] if len(rest) > 1 else "main")
                return self._json(
                    200,
                    {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": commit.oid,
                        "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                        "tags": [],
                        "library_name": "timm",
                        "lastModified": "2024-01-01T00:00:00.000Z",
                    },
                )
        action = rest[0]
        if action == "preupload" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            with hub.lock:
                repo = self._repo(repo_id, write=True)
                commit = self._commit(repo, rest[1])
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_oid(commit.files[f["path"]]) if f["path"] in commit.files else None,
                    }
                    for f in payload.get("files", [])
                ]
            return self._json(200, {"files": files, "commitOid": commit.oid})
        if action == "commit" and method == "POST":
            return self._commit_route(repo_id, rest[1], query)
        if action == "branch" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            with hub.lock:
                repo = self._repo(repo_id, write=True)
                if rest[1] in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{rest[1]}")
                repo.branches[rest[1]] = self._commit(repo, payload.get("startingPoint") or "main").oid
            return self._json(200, {})
        if action == "tag" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            with hub.lock:
                repo = self._repo(repo_id, write=True)
                if payload["tag"] in repo.tags:
                    raise HubError(409, f"Tag already exists: {payload['tag']}")
                repo.tags[payload["tag"]] = self._commit(repo, rest[1]).oid
            return self._json(200, {})
        if action == "refs" and method == "GET":
            with hub.lock:
                repo = self._repo(repo_id)

                def refs(kind: str, items: dict) -> list[dict]:
                    return [{"name": str(k), "ref": f"refs/{kind}/{k}", "targetCommit": v} for k, v in items.items()]

                data = {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": []}
                if query.get("include_prs"):
                    data["pullRequests"] = refs("pr", repo.pulls)
            return self._json(200, data)
        if action == "tree" and method == "GET":
            with hub.lock:
                commit = self._commit(self._repo(repo_id), rest[1])
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", "false").lower() == "true"
            return self._json(200, _listing(commit.files, prefix, recursive))
        if action == "paths-info" and method == "POST":
            form = parse_qs(self._body().decode())
            with hub.lock:
                commit = self._commit(self._repo(repo_id), rest[1])
            wanted = set(form.get("paths", []))
            entries = _listing(commit.files, "", True)
            return self._json(200, [e for e in entries if e["path"] in wanted])
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _commit_route(self, repo_id: str, revision: str, query: dict) -> None:
        hub = self.hub
        body = self._body()
        if hub.fail_commit:  # the endpoint dies mid-push: the body was read, no answer ever comes
            hub.fail_commit = False
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        create_pr = query.get("create_pr") == "1"
        with hub.lock:
            repo = self._repo(repo_id, write=True)
            base = self._commit(repo, revision)
            if not create_pr and revision not in repo.branches:
                raise HubError(400, f"Cannot commit to {revision}: not a branch")
            header = next((line["value"] for line in lines if line["key"] == "header"), None)
            if header is None:
                raise HubError(400, "the commit payload has no header line")
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for line in lines:  # all operations are validated before anything changes: atomic
                key, value = line["key"], line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "file content must be base64")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    raise HubError(422, "this test endpoint does not implement Git LFS / Xet uploads")
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif key != "header":
                    raise HubError(400, f"unknown commit operation {key!r}")
            oid = hub._new_oid(repo_id)
            repo.commits[oid] = Commit(oid, base.oid, files, header.get("summary", ""))
            pr_url = None
            if create_pr:
                number = max(repo.pulls, default=0) + 1
                repo.pulls[number] = oid
                pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
            else:
                repo.branches[revision] = oid
        self._json(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                "pullRequestUrl": pr_url,
            },
        )

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        with self.hub.lock:
            commit = self._commit(self._repo(repo_id), revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status, body = 200, content
        range_header = self.headers.get("range", "")
        if range_header.startswith("bytes=") and not head:
            start, _, end = range_header[6:].partition("-")
            first, last = int(start or 0), int(end) if end else len(content) - 1
            body = content[first : last + 1]
            status = 206
            headers["Content-Range"] = f"bytes {first}-{first + len(body) - 1}/{len(content)}"
        self._send(status, body, content_type="application/octet-stream", headers=headers, head=head)


def _listing(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """Tree entries under `prefix`: files with oid and size, and the folders on the way."""
    entries, folders = [], set()
    for path in sorted(files):
        if prefix and not path.startswith(prefix + "/"):
            continue
        relative = path[len(prefix) + 1 :] if prefix else path
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(([prefix] if prefix else []) + parts[:depth])
            if (recursive or depth == 1) and folder not in folders:
                folders.add(folder)
                entries.append(
                    {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
                )
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "oid": git_blob_oid(files[path]), "size": len(files[path]), "path": path})
    return entries


def main(argv: list[str] | None = None) -> None:
    """`python -m mochi_hub.publish.local_hub`: serve until Ctrl-C, one user with a fresh token."""
    parser = argparse.ArgumentParser(
        prog="python -m mochi_hub.publish.local_hub",
        description="A Hub-compatible endpoint on 127.0.0.1 to try `mochi push` offline (repositories in memory).",
    )
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (0: any free one) [8080]")
    parser.add_argument("--user", default="me", help="the user (and namespace) the token may write [me]")
    args = parser.parse_args(argv)
    token = f"hf_local_{secrets.token_hex(12)}"
    try:
        hub = LocalHub({token: {"user": args.user, "write": [args.user]}}).start(args.port)
    except OSError as error:
        raise SystemExit(f"Error: --port {args.port}: {error.strerror or error}") from None
    print(f"a local Hub endpoint at {hub.url} (repositories in memory; Ctrl-C stops it). In another shell:", flush=True)
    print(f"  export HF_ENDPOINT={hub.url} HF_TOKEN={token}", flush=True)
    print(f"  mochi push runs/demo --repo-id {args.user}/mochi-demo")
    print(f"  python -c \"import timm; timm.create_model('hf-hub:{args.user}/mochi-demo', pretrained=True)\"")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
