"""A small Hugging Face Hub for tests: the HTTP endpoints ``huggingface_hub`` uses to publish and download.

Serves on 127.0.0.1 (a free port) from a background thread; point ``HF_ENDPOINT`` at :attr:`HubServer.url`.
Files are stored in a temporary folder, one blob per content hash; every commit is an immutable
snapshot (path -> blob) and branches point at commits. Implemented:

* ``POST /api/repos/create`` (409 when it exists), ``POST /api/{type}s/{repo}/branch/{branch}``;
* ``POST /api/{type}s/{repo}/preupload/{rev}``: every file is answered ``uploadMode: regular``, so the
  client sends all contents inline (base64) in the commit and no LFS or Xet transfer is needed;
* ``POST /api/{type}s/{repo}/commit/{rev}``: the NDJSON commit (``header``, ``file``, ``deletedFile``);
  with ``?create_pr=1`` it opens a pull request instead: the commit goes to a new ``refs/pr/N`` ref
  (branch ``rev`` untouched) and the answer's ``pullRequestUrl`` ends in ``/discussions/N``, as the Hub's;
* ``POST /api/{type}s/{repo}/discussions`` with ``pullRequest: true`` (a pull request against main: a new
  ``refs/pr/N`` ref at main's head, committed to like a branch) and ``GET .../discussions/{num}``, the
  way newer clients open a pull request before committing to it;
* ``POST /api/validate-yaml``;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``,
  errors with the ``X-Error-Code`` the client maps to its exceptions;
* ``GET /api/{type}s/{repo}[/revision/{rev}]`` (repo info with siblings), ``GET .../tree/{rev}[/{path}]``;
* ``GET /api/whoami-v2``.

:meth:`HubServer.pull_requests` lists the pull requests opened on a repo.

Faults, for the error paths: :attr:`HubServer.fail_commits` answers the next N commits with a 500,
:attr:`HubServer.drop_commits` closes the connection of the next N commits without an answer.
:attr:`HubServer.requests` logs ``(method, path)`` of every request.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ['HubServer']

_REPO_TYPES = ('model', 'dataset', 'space')


class _Repo:
    def __init__(self, repo_id: str, repo_type: str, private: bool):
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.private = private
        self.commits: Dict[str, Dict[str, str]] = {}  # commit oid -> {path: blob sha256}
        self.branches: Dict[str, str] = {}  # branch (or refs/pr/N) -> commit oid
        self.pull_requests: List[Dict[str, Any]] = []  # num, ref (refs/pr/N), target branch, title

    def open_pull_request(self, target: str, title: str, oid: str) -> Dict[str, Any]:
        """A new pull request against ``target`` whose ref ``refs/pr/N`` points at commit ``oid``."""
        num = len(self.pull_requests) + 1
        pr = dict(num=num, ref=f'refs/pr/{num}', target=target, title=title)
        self.pull_requests.append(pr)
        self.branches[pr['ref']] = oid
        return pr

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubServer:
    """The test Hub. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        token: the only token accepted (``Authorization: Bearer <token>``).
        user: the user the token belongs to (``whoami``).
    """

    def __init__(self, token: str = 'hf_test_token', user: str = 'tester'):
        self.token = token
        self.user = user
        self.fail_commits = 0
        self.drop_commits = 0
        self.requests: List[Tuple[str, str]] = []
        self.repos: Dict[Tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._root = tempfile.mkdtemp(prefix='hub-server-')
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> 'HubServer':
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name='hub-server', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> 'HubServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The endpoint, ``http://127.0.0.1:<port>``."""
        return f'http://127.0.0.1:{self._server.server_address[1]}'

    # -- storage ----------------------------------------------------------------------------------
    def _put_blob(self, content: bytes) -> str:
        digest = hashlib.sha256(content).hexdigest()
        path = os.path.join(self._root, digest)
        if not os.path.exists(path):
            tmp = f'{path}.{threading.get_ident()}.tmp'
            with open(tmp, 'wb') as f:
                f.write(content)
            os.replace(tmp, path)
        return digest

    def blob(self, digest: str) -> bytes:
        """The stored content of a blob."""
        with open(os.path.join(self._root, digest), 'rb') as f:
            return f.read()

    def files(self, repo_id: str, revision: str = 'main', repo_type: str = 'model') -> Dict[str, bytes]:
        """The files of a repo at a revision (empty when the repo or revision does not exist)."""
        repo = self.repos.get((repo_type, repo_id))
        oid = repo.resolve(revision) if repo else None
        return {p: self.blob(d) for p, d in repo.commits[oid].items()} if oid else {}

    def pull_requests(self, repo_id: str, repo_type: str = 'model') -> List[Dict[str, Any]]:
        """The pull requests opened on a repo: ``num``, ``ref`` (``refs/pr/N``), ``target`` and ``title``."""
        repo = self.repos.get((repo_type, repo_id))
        return [dict(pr) for pr in repo.pull_requests] if repo else []

    def commit_count(self, repo_id: str, repo_type: str = 'model') -> int:
        """Number of commits made to a repo (its creation's empty commit included)."""
        repo = self.repos.get((repo_type, repo_id))
        return len(repo.commits) if repo else 0


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = 'HTTP/1.1'

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server_hub

    def _body(self) -> bytes:
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _authorized(self) -> bool:
        return self.headers.get('Authorization', '') == f'Bearer {self.hub.token}'

    def _send(self, status: int, body: Any = b'', headers: Optional[Dict[str, str]] = None,
              head: bool = False) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {'Content-Type': 'application/json', **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: Optional[str], message: str, head: bool = False) -> None:
        headers = {'X-Error-Message': message}
        if code:
            headers['X-Error-Code'] = code
        self._send(status, {'error': message}, headers, head=head)

    def _repo(self, repo_type: str, repo_id: str, head: bool = False) -> Optional[_Repo]:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, 'RepoNotFound', 'Repository not found', head=head)
            return None
        return repo

    def _writable_repo(self, kind: str, repo_id: str) -> Optional[_Repo]:
        """The repo a write goes to; None after answering 401 (bad token) or 404 (no such repo)."""
        if not self._authorized():
            self._error(401, None, 'Invalid credentials in Authorization header')
            return None
        return self._repo(kind, repo_id)

    def _snapshot(self, kind: str, repo_id: str, revision: str, head: bool = False) -> Optional[Tuple[_Repo, str]]:
        """The repo and the commit a revision names; None after answering 404 (no repo or revision)."""
        repo = self._repo(kind, repo_id, head=head)
        if repo is None:
            return None
        oid = repo.resolve(revision)
        if oid is None:
            self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}', head=head)
            return None
        return repo, oid

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        self.hub.requests.append((method, unquote(path)))
        if method in ('GET', 'HEAD'):
            match = re.fullmatch(r'/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)', path)
            if match:
                kind = (match.group(1) or 'models')[:-1]
                return self._resolve(kind, match.group(2), unquote(match.group(3)), unquote(match.group(4)),
                                     head=method == 'HEAD')
        if method == 'GET' and path == '/api/whoami-v2':
            if not self._authorized():
                return self._error(401, None, 'Invalid credentials in Authorization header')
            return self._send(200, {'type': 'user', 'name': self.hub.user, 'fullname': self.hub.user,
                                    'orgs': [], 'auth': {'type': 'access_token',
                                                         'accessToken': {'displayName': 'test', 'role': 'write'}}})
        if method == 'POST' and path == '/api/validate-yaml':
            self._body()
            return self._send(200, {})
        if method == 'POST' and path == '/api/repos/create':
            return self._create_repo()
        match = re.fullmatch(r'/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?', path)
        if not match:
            self._body()
            return self._error(404, None, f'No route for {method} {path}')
        kind, repo_id, rest = match.group(1)[:-1], match.group(2), match.group(3) or ''
        if method == 'POST':
            for name, handler in (('preupload', self._preupload), ('commit', self._commit),
                                  ('branch', self._branch)):
                if rest.startswith(name + '/'):
                    return handler(kind, repo_id, unquote(rest[len(name) + 1:]))
            if rest == 'discussions':
                return self._open_discussion(kind, repo_id)
        if method == 'GET':
            if re.fullmatch(r'discussions/\d+', rest):
                return self._discussion(kind, repo_id, int(rest.split('/')[1]))
            if rest == '' or rest.startswith('revision/'):
                return self._info(kind, repo_id, unquote(rest[len('revision/'):]) if rest else 'main')
            if rest.startswith('tree/'):
                revision, _, folder = rest[len('tree/'):].partition('/')
                return self._tree(kind, repo_id, unquote(revision), unquote(folder))
        self._body()
        self._error(404, None, f'No route for {method} {path}')

    def do_GET(self) -> None:
        self._route('GET')

    def do_HEAD(self) -> None:
        self._route('HEAD')

    def do_POST(self) -> None:
        self._route('POST')

    # -- endpoints --------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = json.loads(self._body() or b'{}')
        if not self._authorized():
            return self._error(401, None, 'Invalid credentials in Authorization header')
        name, org = payload.get('name'), payload.get('organization') or self.hub.user
        kind = payload.get('type') or 'model'
        repo_id = f'{org}/{name}'
        private = bool(payload.get('private')) or payload.get('visibility') == 'private'
        with self.hub._lock:
            if (kind, repo_id) in self.hub.repos:
                return self._send(409, {'error': 'You already created this repo', 'url': self._repo_url(kind, repo_id)})
            repo = _Repo(repo_id, kind, private)
            oid = hashlib.sha1(f'{repo_id}-initial'.encode()).hexdigest()
            repo.commits[oid] = {}
            repo.branches['main'] = oid
            self.hub.repos[(kind, repo_id)] = repo
        self._send(200, {'url': self._repo_url(kind, repo_id), 'name': repo_id})

    def _repo_url(self, kind: str, repo_id: str) -> str:
        return f'{self.hub.url}/{"" if kind == "model" else kind + "s/"}{repo_id}'

    def _branch(self, kind: str, repo_id: str, branch: str) -> None:
        self._body()
        repo = self._writable_repo(kind, repo_id)
        if repo is None:
            return
        with self.hub._lock:
            if branch in repo.branches:
                return self._error(409, None, f'Branch {branch} already exists')
            repo.branches[branch] = repo.branches['main']
        self._send(200, {})

    def _preupload(self, kind: str, repo_id: str, revision: str) -> None:
        payload = json.loads(self._body() or b'{}')
        repo = self._writable_repo(kind, repo_id)
        if repo is None:
            return
        oid = repo.resolve(revision)
        current = repo.commits.get(oid, {})
        files = []
        for item in payload.get('files', []):
            digest = current.get(item['path'])
            files.append({'path': item['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
                          'oid': _git_blob_oid(self.hub.blob(digest)) if digest else None})
        self._send(200, {'files': files})

    def _commit(self, kind: str, repo_id: str, revision: str) -> None:
        body = self._body()
        create_pr = parse_qs(urlsplit(self.path).query).get('create_pr', ['0'])[0].lower() in ('1', 'true')
        if self.hub.drop_commits > 0:
            self.hub.drop_commits -= 1
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the connection end with no answer
            return
        if self.hub.fail_commits > 0:
            self.hub.fail_commits -= 1
            return self._error(500, None, 'Internal Error (injected by the test server)')
        repo = self._writable_repo(kind, repo_id)
        if repo is None:
            return
        with self.hub._lock:
            parent = repo.resolve(revision)
            if parent is None or revision not in repo.branches:
                return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
            files = dict(repo.commits[parent])
            summary = ''
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item['key'], item['value']
                if key == 'header':
                    summary = value.get('summary', '')
                elif key == 'file':
                    if value.get('encoding') != 'base64':
                        return self._error(400, None, f'Unsupported encoding {value.get("encoding")!r}')
                    files[value['path']] = self.hub._put_blob(base64.b64decode(value['content']))
                elif key == 'deletedFile':
                    files.pop(value['path'], None)
                elif key == 'deletedFolder':
                    files = {p: d for p, d in files.items() if not p.startswith(value['path'].rstrip('/') + '/')}
                else:
                    return self._error(400, None, f'This test Hub takes inline files only, got {key!r}')
            oid = hashlib.sha1(json.dumps([parent, summary, sorted(files.items()), time.time()]).encode()).hexdigest()
            repo.commits[oid] = files
            pr_url = None
            if create_pr:  # a pull request: a new refs/pr/N ref; the target branch is untouched
                pr = repo.open_pull_request(revision, summary, oid)
                pr_url = f'{self._repo_url(kind, repo_id)}/discussions/{pr["num"]}'
            else:
                repo.branches[revision] = oid
        self._send(200, {'success': True, 'commitOid': oid, 'commitMessage': summary,
                         'commitUrl': f'{self._repo_url(kind, repo_id)}/commit/{oid}', 'pullRequestUrl': pr_url})

    def _open_discussion(self, kind: str, repo_id: str) -> None:
        payload = json.loads(self._body() or b'{}')
        repo = self._writable_repo(kind, repo_id)
        if repo is None:
            return
        if not payload.get('pullRequest'):
            return self._error(400, None, 'This test Hub opens pull requests only, not discussions')
        with self.hub._lock:
            pr = repo.open_pull_request('main', payload.get('title', ''), repo.branches['main'])
        self._send(200, {'num': pr['num'], 'pullRequest': True,
                         'url': f'{self._repo_url(kind, repo_id)}/discussions/{pr["num"]}'})

    def _discussion(self, kind: str, repo_id: str, num: int) -> None:
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        if not 1 <= num <= len(repo.pull_requests):
            return self._error(404, None, f'Discussion {num} not found')
        pr = repo.pull_requests[num - 1]
        self._send(200, {
            'num': num, 'title': pr['title'], 'status': 'draft', 'isPullRequest': True,
            'author': {'name': self.hub.user}, 'createdAt': '2026-01-01T00:00:00.000Z',
            'repo': {'name': repo_id, 'type': kind}, 'events': [], 'filesWithConflicts': [], 'diff': '',
            'changes': {'base': f'refs/heads/{pr["target"]}'},
        })

    def _resolve(self, kind: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        found = self._snapshot(kind, repo_id, revision, head=head)
        if found is None:
            return
        repo, oid = found
        digest = repo.commits[oid].get(path)
        if digest is None:
            return self._error(404, 'EntryNotFound', f'{path} does not exist at {revision}', head=head)
        content = self.hub.blob(digest)
        self._send(200, content, {'X-Repo-Commit': oid, 'ETag': f'"{_git_blob_oid(content)}"',
                                  'Content-Type': 'application/octet-stream'}, head=head)

    def _info(self, kind: str, repo_id: str, revision: str) -> None:
        found = self._snapshot(kind, repo_id, revision)
        if found is None:
            return
        repo, oid = found
        files = repo.commits[oid]
        self._send(200, {
            'id': repo_id, 'modelId': repo_id, 'sha': oid, 'private': repo.private, 'disabled': False,
            'gated': False, 'downloads': 0, 'likes': 0, 'tags': [], 'library_name': 'timm',
            'createdAt': '2026-01-01T00:00:00.000Z', 'lastModified': '2026-01-01T00:00:00.000Z',
            'siblings': [{'rfilename': p} for p in sorted(files)],
        })

    def _tree(self, kind: str, repo_id: str, revision: str, folder: str) -> None:
        found = self._snapshot(kind, repo_id, revision)
        if found is None:
            return
        repo, oid = found
        prefix = folder.rstrip('/') + '/' if folder else ''
        entries, folders = [], set()
        for path, digest in sorted(repo.commits[oid].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if '/' in rest:
                folders.add(prefix + rest.split('/')[0])
                continue
            content = self.hub.blob(digest)
            entries.append({'type': 'file', 'oid': _git_blob_oid(content), 'size': len(content), 'path': path})
        entries += [{'type': 'directory', 'oid': '0' * 40, 'size': 0, 'path': p} for p in sorted(folders)]
        self._send(200, entries)
