#!/usr/bin/env python3
"""Soak test against a real `zeroboot serve`: many one-shot executions and
many calls into one long-lived sandbox, then checks that the server's open
fds, RSS and worker processes came back to where they started.

    scripts/soak.py [--execs 10000] [--session-execs 1000] [--concurrency 2]

Starts target/release/zeroboot serve itself; exits non-zero if anything
grew or any request failed.
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import urllib.request


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def snapshot(pid):
    children = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children += 1
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_kib": proc_status(pid, "VmRSS"),
        "threads": proc_status(pid, "Threads"),
        "children": children,
    }


def call(url, path, body=None, method="POST"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read()
        return r.status, (json.loads(text) if text else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--execs", type=int, default=10000)
    p.add_argument("--session-execs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=2)
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = subprocess.Popen(
        [os.path.join(root, "target/release/zeroboot"), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stdout:
            m = re.match(r"zeroboot: listening on (\S+)", line)
            if m:
                url = m.group(1)
                break
        if not url:
            sys.exit("zeroboot serve did not start")

        def one_shot(i):
            status, body = call(url, "/v1/exec", {"code": f"print({i} * 2)"})
            if status != 200 or body["stdout"] != f"{i * 2}\n":
                raise RuntimeError(f"exec {i}: {status} {body}")

        # Warm up (pool, allocator), then measure.
        for i in range(20):
            one_shot(i)
        time.sleep(1)
        start = snapshot(server.pid)
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one_shot, range(args.execs)))
        execs_s = time.time() - t0

        status, sandbox = call(url, "/v1/sandboxes", {})
        assert status == 201, sandbox
        sid = sandbox["id"]
        call(url, f"/v1/sandboxes/{sid}/exec", {"code": "n = 0"})
        t0 = time.time()
        for i in range(args.session_execs):
            status, body = call(url, f"/v1/sandboxes/{sid}/exec", {"code": "n += 1\nprint(n)"})
            if status != 200 or body["stdout"] != f"{i + 1}\n":
                raise RuntimeError(f"session exec {i}: {status} {body}")
        session_s = time.time() - t0
        call(url, f"/v1/sandboxes/{sid}", method="DELETE")
        time.sleep(2)
        end = snapshot(server.pid)
    finally:
        server.terminate()
        server.wait()

    print(f"{args.execs} one-shot execs in {execs_s:.1f} s ({args.execs / execs_s:.1f}/s, "
          f"concurrency {args.concurrency}); {args.session_execs} execs in one sandbox in {session_s:.1f} s")
    for key in start:
        print(f"  {key:9} start {start[key]:>8}  end {end[key]:>8}")
    grew = []
    if end["fds"] > start["fds"] + 8:
        grew.append("fds")
    if end["rss_kib"] > start["rss_kib"] + 32 * 1024:
        grew.append("RSS")
    if end["children"] > start["children"]:
        grew.append("worker processes")
    if end["threads"] > start["threads"] + 4:
        grew.append("threads")
    if grew:
        sys.exit("grew: " + ", ".join(grew))
    print("flat")


if __name__ == "__main__":
    main()
