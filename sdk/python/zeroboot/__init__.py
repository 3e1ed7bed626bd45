"""Client for the zeroboot HTTP API (see /v1/openapi.json on a server).

    from zeroboot import Sandbox

    sb = Sandbox("http://127.0.0.1:8080", api_key=None)
    print(sb.run("print(1+1)").stdout)          # a new VM per call
    for event in sb.stream("print('hi')"):      # output as it is written
        print(event.kind, event.text)
    with sb.session() as s:                     # a long-lived sandbox
        s.exec("x = 41")
        child, = s.fork()                        # starts where s is now
        print(child.exec("print(x + 1)").stdout)
        s.write_file("/home/user/data.csv", open("data.csv", "rb"))  # streamed
        print([f.name for f in s.list_dir("/home/user")])

`AsyncSandbox` and `AsyncSession` offer the same calls as coroutines.
Only the standard library is used.
"""

from ._client import (
    AsyncSandbox,
    AsyncSession,
    Event,
    ExecResult,
    FileInfo,
    Sandbox,
    SandboxInfo,
    Session,
    ZerobootError,
)

__all__ = [
    "AsyncSandbox",
    "AsyncSession",
    "Event",
    "FileInfo",
    "ExecResult",
    "Sandbox",
    "SandboxInfo",
    "Session",
    "ZerobootError",
]
