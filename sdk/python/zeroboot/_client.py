from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, BinaryIO, Dict, Iterator, List, Mapping, Optional, Sequence, Union


class ZerobootError(Exception):
    """An error the server answered with: `{error: {code, message}}`."""

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool
    template: str
    id: str
    fork_time_ms: float
    exec_time_ms: float
    total_time_ms: float
    #: The exact bytes, base64, only where a stream is not valid UTF-8.
    stdout_base64: Optional[str] = None
    stderr_base64: Optional[str] = None
    #: Rich results, as Jupyter gives them: ``{"type": "execute_result" |
    #: "display_data", "data": {MIME type: value}}`` (images base64).
    results: List[Dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ExecResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def images(self) -> List[bytes]:
        """The PNG images among the results, decoded."""
        return [base64.b64decode(r["data"]["image/png"]) for r in self.results if "image/png" in r.get("data", {})]

    @property
    def stdout_bytes(self) -> bytes:
        """stdout exactly as the code wrote it."""
        return _exact(self.stdout, self.stdout_base64)

    @property
    def stderr_bytes(self) -> bytes:
        """stderr exactly as the code wrote it."""
        return _exact(self.stderr, self.stderr_base64)


def _exact(text: str, b64: Optional[str]) -> bytes:
    return base64.b64decode(b64) if b64 is not None else text.encode("utf-8")


@dataclass
class SandboxInfo:
    id: str
    template: str
    parent: Optional[str]
    ttl_seconds: float
    idle_seconds: float
    # "running", or "paused": on the server's disk, without a VM; the next
    # call resumes it.
    state: str = "running"

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SandboxInfo":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


@dataclass
class FileInfo:
    """A file, directory or link in a sandbox."""

    name: str
    path: str
    #: ``file``, ``dir``, ``symlink`` or ``other``.
    type: str
    size: int
    #: Permission bits, e.g. ``0o644``.
    mode: int
    #: Last modification, seconds since the epoch.
    modified_unix: float

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "FileInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Event:
    """One Server-Sent Event of a streamed run: `stdout` or `stderr` with
    `text`, then `result` with `result`."""

    kind: str
    text: str = ""
    result: Optional[ExecResult] = None
    error: Optional[ZerobootError] = field(default=None)


class _Http:
    def __init__(self, url: str, api_key: Optional[str], timeout: float):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any, content_type: str, accept: str,
                 length: Optional[int] = None):
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise _error(e) from None

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self._request(method, path, body, "application/json", "application/json") as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def raw(self, method: str, path: str, body: Optional[bytes] = None) -> bytes:
        with self._request(method, path, body, "application/octet-stream", "*/*") as resp:
            return resp.read()

    def upload(self, path: str, source: BinaryIO, length: int) -> None:
        """PUTs `length` bytes read from `source`, streamed."""
        with self._request("PUT", path, source, "application/octet-stream", "*/*", length) as resp:
            resp.read()

    def download(self, path: str, out: BinaryIO, chunk: int = 1 << 20) -> int:
        """GETs `path` into `out`, streamed; returns the bytes written."""
        total = 0
        with self._request("GET", path, None, "application/octet-stream", "*/*") as resp:
            while True:
                piece = resp.read(chunk)
                if not piece:
                    return total
                out.write(piece)
                total += len(piece)

    def events(self, path: str, payload: Any) -> Iterator[Event]:
        body = json.dumps(payload).encode()
        with self._request("POST", path, body, "application/json", "text/event-stream") as resp:
            name, data = "message", []
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    yield _event(name, json.loads("\n".join(data)))
                    name, data = "message", []


def _error(e: urllib.error.HTTPError) -> ZerobootError:
    try:
        body = json.loads(e.read())["error"]
        code, message = body["code"], body["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", str(e)
    retry = e.headers.get("Retry-After") if e.headers else None
    return ZerobootError(e.code, code, message, float(retry) if retry else None)


def _event(name: str, data: Dict[str, Any]) -> Event:
    if name == "result":
        return Event("result", result=ExecResult.from_json(data))
    if name == "error":
        err = data.get("error", {})
        return Event("error", error=ZerobootError(0, err.get("code", "error"), err.get("message", "")))
    return Event(name, text=data.get("data", ""))


def _exec_body(code: str, language: str, timeout_seconds: float, stdin: str, template: Optional[str],
               env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
               user: Optional[str] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {"code": code, "language": language, "timeout_seconds": timeout_seconds, "stdin": stdin}
    if template:
        body["template"] = template
    return _with_context(body, env, cwd, user)


def _with_context(body: Dict[str, Any], env: Optional[Mapping[str, str]], cwd: Optional[str],
                  user: Optional[str]) -> Dict[str, Any]:
    """Adds environment variables, a working directory and a user
    (`"user"`, the default, or `"root"`) to a request body."""
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = user
    return body


class Sandbox:
    """A zeroboot server. Every `run` forks a brand-new VM."""

    def __init__(self, url: str = "http://127.0.0.1:8080", api_key: Optional[str] = None, timeout: float = 600.0):
        self._http = _Http(url, api_key, timeout)

    def run(
        self,
        code: str,
        *,
        language: str = "python",
        timeout_seconds: float = 30.0,
        stdin: str = "",
        template: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
    ) -> ExecResult:
        """Runs `code` in a new VM; `env`, `cwd` and `user` (`"user"` or
        `"root"`) set its environment variables, working directory and user."""
        body = _exec_body(code, language, timeout_seconds, stdin, template, env, cwd, user)
        return ExecResult.from_json(self._http.json("POST", "/v1/exec", body))

    def run_batch(self, codes: Sequence[str], *, language: str = "python", timeout_seconds: float = 30.0
                  ) -> List[Union[ExecResult, ZerobootError]]:
        """Runs each code in its own VM, in parallel; an entry that failed
        alone is its error."""
        body = {"executions": [_exec_body(c, language, timeout_seconds, "", None) for c in codes]}
        out: List[Union[ExecResult, ZerobootError]] = []
        for entry in self._http.json("POST", "/v1/exec/batch", body)["results"]:
            if "error" in entry:
                out.append(ZerobootError(0, entry["error"]["code"], entry["error"]["message"]))
            else:
                out.append(ExecResult.from_json(entry))
        return out

    def stream(self, code: str, *, language: str = "python", timeout_seconds: float = 30.0, stdin: str = "",
               env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
               user: Optional[str] = None) -> Iterator[Event]:
        """Yields output events as the code writes, then the result event."""
        body = _exec_body(code, language, timeout_seconds, stdin, None, env, cwd, user)
        body["stream"] = True
        return self._http.events("/v1/exec", body)

    def session(self, *, language: str = "python", ttl_seconds: Optional[float] = None,
                template: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                cwd: Optional[str] = None, user: Optional[str] = None) -> "Session":
        """Starts a long-lived sandbox (see `Session`); `env`, `cwd` and
        `user` hold for every call in it, under each call's own."""
        body: Dict[str, Any] = _with_context({"language": language}, env, cwd, user)
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if template:
            body["template"] = template
        info = SandboxInfo.from_json(self._http.json("POST", "/v1/sandboxes", body))
        return Session(self._http, info)

    def sessions(self) -> List[SandboxInfo]:
        return [SandboxInfo.from_json(s) for s in self._http.json("GET", "/v1/sandboxes")["sandboxes"]]

    def attach(self, sandbox_id: str) -> "Session":
        """The existing long-lived sandbox `sandbox_id` (running or paused),
        made by this client or another, perhaps before the server restarted."""
        info = SandboxInfo.from_json(self._http.json("GET", f"/v1/sandboxes/{sandbox_id}"))
        return Session(self._http, info)

    def health(self) -> Dict[str, Any]:
        return self._http.json("GET", "/v1/health")


class Session:
    """A long-lived sandbox: variables, imports and files persist between
    `exec` calls. Close it (or use `with`) to free its VM."""

    def __init__(self, http: _Http, info: SandboxInfo):
        self._http = http
        self.info = info
        self.id = info.id

    def exec(self, code: str, *, timeout_seconds: float = 30.0, stdin: str = "",
             env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
             user: Optional[str] = None) -> ExecResult:
        body = _with_context({"code": code, "timeout_seconds": timeout_seconds, "stdin": stdin}, env, cwd, user)
        return ExecResult.from_json(self._http.json("POST", f"/v1/sandboxes/{self.id}/exec", body))

    def pause(self) -> SandboxInfo:
        """Saves the sandbox to the server's disk (what it changed since its
        template) and frees its VM; the next call resumes it, also in a
        restarted server."""
        self.info = SandboxInfo.from_json(self._http.json("POST", f"/v1/sandboxes/{self.id}/pause"))
        return self.info

    def fork(self, count: int = 1) -> List["Session"]:
        """New sessions that start from this one's current state."""
        forked = self._http.json("POST", f"/v1/sandboxes/{self.id}/fork", {"count": count})
        return [Session(self._http, SandboxInfo.from_json(s)) for s in forked["sandboxes"]]

    def write_file(self, path: str, data: Union[bytes, bytearray, memoryview, str, BinaryIO]) -> None:
        """Writes a file (creating its directories), replacing any file
        there once all of it is written. `data` may be an open binary file,
        which is streamed, not read into memory."""
        url = f"/v1/sandboxes/{self.id}/files/{_quote(path)}"
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._http.raw("PUT", url, bytes(data))
            return
        start = data.tell()
        length = data.seek(0, 2) - start
        data.seek(start)
        self._http.upload(url, data, length)

    def read_file(self, path: str) -> bytes:
        return self._http.raw("GET", f"/v1/sandboxes/{self.id}/files/{_quote(path)}")

    def read_file_to(self, path: str, out: BinaryIO) -> int:
        """Streams a file into the open binary file `out`; returns its size."""
        return self._http.download(f"/v1/sandboxes/{self.id}/files/{_quote(path)}", out)

    def stat(self, path: str) -> FileInfo:
        return FileInfo.from_json(self._http.json("GET", f"/v1/sandboxes/{self.id}/stat/{_quote(path)}"))

    def list_dir(self, path: str) -> List[FileInfo]:
        """A directory's entries, sorted by name."""
        listing = self._http.json("GET", f"/v1/sandboxes/{self.id}/dirs/{_quote(path)}")
        return [FileInfo.from_json(e) for e in listing["entries"]]

    def make_dir(self, path: str) -> None:
        """Makes a directory and its parents; an existing one is fine."""
        self._http.raw("PUT", f"/v1/sandboxes/{self.id}/dirs/{_quote(path)}", b"")

    def remove(self, path: str) -> None:
        """Removes a file, or a directory and everything in it."""
        self._http.raw("DELETE", f"/v1/sandboxes/{self.id}/files/{_quote(path)}")

    def rename(self, source: str, target: str) -> None:
        """Moves a file or directory, creating the target's parents."""
        self._http.json("POST", f"/v1/sandboxes/{self.id}/rename", {"from": source, "to": target})

    def close(self) -> None:
        try:
            self._http.raw("DELETE", f"/v1/sandboxes/{self.id}")
        except ZerobootError as e:
            if e.status != 404:
                raise

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _quote(path: str) -> str:
    return urllib.parse.quote(path.lstrip("/"))


class AsyncSandbox:
    """`Sandbox` for asyncio: each call runs in a worker thread, so the event
    loop never blocks on the network."""

    def __init__(self, url: str = "http://127.0.0.1:8080", api_key: Optional[str] = None, timeout: float = 600.0):
        self._sync = Sandbox(url, api_key, timeout)

    async def run(self, code: str, **kwargs: Any) -> ExecResult:
        return await asyncio.to_thread(self._sync.run, code, **kwargs)

    async def run_batch(self, codes: Sequence[str], **kwargs: Any) -> List[Union[ExecResult, ZerobootError]]:
        return await asyncio.to_thread(self._sync.run_batch, codes, **kwargs)

    async def stream(self, code: str, **kwargs: Any) -> AsyncIterator[Event]:
        events = self._sync.stream(code, **kwargs)
        done = object()
        while True:
            event = await asyncio.to_thread(next, events, done)
            if event is done:
                return
            yield event  # type: ignore[misc]

    async def session(self, **kwargs: Any) -> "AsyncSession":
        return AsyncSession(await asyncio.to_thread(self._sync.session, **kwargs))

    async def sessions(self) -> List[SandboxInfo]:
        return await asyncio.to_thread(self._sync.sessions)

    async def attach(self, sandbox_id: str) -> "AsyncSession":
        return AsyncSession(await asyncio.to_thread(self._sync.attach, sandbox_id))

    async def health(self) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.health)


class AsyncSession:
    def __init__(self, session: Session):
        self._sync = session
        self.info = session.info
        self.id = session.id

    async def exec(self, code: str, **kwargs: Any) -> ExecResult:
        return await asyncio.to_thread(self._sync.exec, code, **kwargs)

    async def pause(self) -> SandboxInfo:
        return await asyncio.to_thread(self._sync.pause)

    async def fork(self, count: int = 1) -> List["AsyncSession"]:
        return [AsyncSession(s) for s in await asyncio.to_thread(self._sync.fork, count)]

    async def write_file(self, path: str, data: Union[bytes, bytearray, memoryview, str, BinaryIO]) -> None:
        await asyncio.to_thread(self._sync.write_file, path, data)

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self._sync.read_file, path)

    async def read_file_to(self, path: str, out: BinaryIO) -> int:
        return await asyncio.to_thread(self._sync.read_file_to, path, out)

    async def stat(self, path: str) -> FileInfo:
        return await asyncio.to_thread(self._sync.stat, path)

    async def list_dir(self, path: str) -> List[FileInfo]:
        return await asyncio.to_thread(self._sync.list_dir, path)

    async def make_dir(self, path: str) -> None:
        await asyncio.to_thread(self._sync.make_dir, path)

    async def remove(self, path: str) -> None:
        await asyncio.to_thread(self._sync.remove, path)

    async def rename(self, source: str, target: str) -> None:
        await asyncio.to_thread(self._sync.rename, source, target)

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()
