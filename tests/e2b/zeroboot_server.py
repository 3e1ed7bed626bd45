"""Starts a real `zeroboot serve` for the E2B SDK tests and bench, and
points E2B's SDKs at it the way a user does: three environment variables."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("ZEROBOOT_BIN", str(REPO / "target" / "release" / "zeroboot"))


def start(pause_dir, pool=1):
    """A server with the python and code-interpreter templates, pausing to
    `pause_dir`; returns its process once it listens."""
    if not Path(BINARY).exists():
        raise RuntimeError(f"{BINARY} is missing: build zeroboot first (cargo build --release)")
    server = subprocess.Popen(
        [BINARY, "serve", "--listen", "127.0.0.1:0", "--pool", str(pool), "--template", "python",
         "--template", "code-interpreter", "--pause-dir", str(pause_dir)],
        stdout=subprocess.PIPE, text=True,
    )
    for line in server.stdout:
        if line.startswith("zeroboot: listening on "):
            url = line.split()[-1]
            break
    else:
        raise RuntimeError("zeroboot serve exited before listening (is /dev/kvm there? are the templates built?)")
    os.environ.update(E2B_API_KEY="any-key", E2B_API_URL=url, E2B_SANDBOX_URL=url)
    return server


def stop(server):
    server.terminate()
    server.wait(timeout=30)
    server.stdout.close()
