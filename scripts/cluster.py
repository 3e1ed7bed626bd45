#!/usr/bin/env python3
"""Several `zeroboot serve` nodes behind a real load balancer, on one machine.

Each node is a `zeroboot serve --node-id nK` in a network namespace of its
own (iproute2, veth), reached at 10.77.K.2:8080; HAProxy (Debian's) listens
on 127.0.0.1 in front of them, configured as docs/kubernetes.md says:

- a call that names a sandbox (`/v1/sandboxes/sbx_nK_...`, E2B's
  `/sandboxes/...` and `E2b-Sandbox-Id`) goes to node K, whose id the
  sandbox id carries; if node K is down, that call gets a 503 in the API's
  error shape, and nothing else does;
- everything else (one-shot execs, creating sandboxes) is spread round
  robin over the nodes that pass their health check, and retried on
  another node when a connection fails.

    scripts/cluster.py test         # the checks scripts/test.sh runs (needs root)
    scripts/cluster.py bench        # requests per second with 1, 2 and 3 nodes (wrk)

Needs root (network namespaces), haproxy and wrk (scripts/install-deps.sh),
/dev/kvm and the python template (built by the tests before it).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = os.environ.get("ZEROBOOT_BIN", str(REPO / "target" / "release" / "zeroboot"))
KEY = "cluster-test-key-0123456789abcdef"
TAG = f"{os.getpid() % 10000}"


def run(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Cluster:
    """`nodes` servers in namespaces of their own and HAProxy before them;
    everything is removed on exit, also after a failure."""

    def __init__(self, nodes, pool=2):
        self.count = nodes
        self.pool = pool
        self.dir = Path(tempfile.mkdtemp(prefix="zeroboot-cluster-"))
        self.servers = {}
        self.haproxy = None
        self.namespaces = []
        self.port = None

    def ns(self, k):
        return f"zb{TAG}n{k}"

    def address(self, k):
        return f"10.77.{k}.2"

    def __enter__(self):
        try:
            (self.dir / "keys").write_text(KEY + "\n")
            for k in range(1, self.count + 1):
                self.add_namespace(k)
                self.start_node(k)
            self.start_haproxy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_):
        for proc in [self.haproxy, *self.servers.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        for k in range(1, self.count + 1):
            run("ip", "link", "del", f"zb{TAG}h{k}", check=False)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    def add_namespace(self, k):
        ns, host, inside = self.ns(k), f"zb{TAG}h{k}", f"zb{TAG}i{k}"
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "link", "add", host, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", inside, "netns", ns)
        run("ip", "addr", "add", f"10.77.{k}.1/24", "dev", host)
        run("ip", "link", "set", host, "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(k)}/24", "dev", inside)
        run("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def start_node(self, k):
        log = open(self.dir / f"n{k}.log", "w")
        self.servers[k] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(k), BINARY, "serve", "--listen", "0.0.0.0:8080",
             "--node-id", f"n{k}", "--api-keys", str(self.dir / "keys"), "--pool", str(self.pool),
             "--pause-dir", str(self.dir / f"paused{k}")],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.servers[k].poll() is not None:
                raise SystemExit(f"node n{k} exited: {(self.dir / f'n{k}.log').read_text()}")
            if "listening on" in (self.dir / f"n{k}.log").read_text():
                return
            time.sleep(0.1)
        raise SystemExit(f"node n{k} did not start")

    def kill_node(self, k):
        # SIGKILL, as a crashed machine: ip netns exec runs the server itself.
        self.servers[k].send_signal(signal.SIGKILL)
        self.servers[k].wait()

    def start_haproxy(self):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        error = json.dumps({"error": {"code": "node_unavailable", "message":
                           "the node that holds this sandbox is down; its sandboxes are gone"}})
        (self.dir / "503.http").write_text(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-cache\r\nConnection: close\r\n\r\n{error}\n")
        servers = "\n".join(
            f"  server n{k} {self.address(k)}:8080 check inter 300ms fall 2 rise 2"
            for k in range(1, self.count + 1))
        pinned = "\n".join(
            f"backend node_n{k}\n  errorfile 503 {self.dir}/503.http\n"
            f"  server n{k} {self.address(k)}:8080 check inter 300ms fall 2 rise 2\n"
            for k in range(1, self.count + 1))
        config = f"""# Generated by scripts/cluster.py; docs/kubernetes.md explains each rule.
global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 330s
  timeout server 330s
  option httpchk GET /v1/health
frontend api
  bind 127.0.0.1:{self.port}
  # The node a sandbox lives on is in its id, sbx_<node>_<random>: in E2B's
  # E2b-Sandbox-Id header, or in the path (/v1/sandboxes/ID/..., E2B's
  # /sandboxes/ID and /v2/sandboxes/ID/connect).
  http-request set-var(txn.node) req.hdr(e2b-sandbox-id),field(2,_) if {{ req.hdr(e2b-sandbox-id) -m beg sbx_ }}
  http-request set-var(txn.node) path,field(4,/),field(2,_) if !{{ var(txn.node) -m found }} {{ path_beg /v1/sandboxes/sbx_ /v2/sandboxes/sbx_ }}
  http-request set-var(txn.node) path,field(3,/),field(2,_) if !{{ var(txn.node) -m found }} {{ path_beg /sandboxes/sbx_ }}
  use_backend node_%[var(txn.node)] if {{ var(txn.node) -m found }}
  default_backend any
backend any
  # Calls that name no sandbox: any node; a connection that fails is tried
  # on another.
  balance roundrobin
  retries 2
  option redispatch
  retry-on conn-failure empty-response
{servers}
{pinned}"""
        (self.dir / "haproxy.cfg").write_text(config)
        check = run("haproxy", "-c", "-f", str(self.dir / "haproxy.cfg"), check=False)
        if check.returncode != 0:
            raise SystemExit(f"haproxy.cfg is invalid:\n{check.stdout}{check.stderr}")
        self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(self.dir / "haproxy.cfg")],
                                        stdout=subprocess.DEVNULL, stderr=open(self.dir / "haproxy.log", "w"))
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                status, _, _ = self.call("GET", "/v1/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("haproxy did not come up")

    def call(self, method, path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {KEY}")
        req.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.headers.get("x-zeroboot-node"), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("x-zeroboot-node"), e.read()


def check(cond, what):
    if not cond:
        raise SystemExit(f"cluster test FAILED: {what}")
    print(f"ok: {what}")


def test():
    with Cluster(3) as c:
        nodes = set()
        for i in range(12):
            status, node, body = c.call("POST", "/v1/exec", {"code": "print(1+1)"})
            if i == 0:
                check(status == 200 and json.loads(body)["stdout"] == "2\n", "a one-shot exec through the balancer")
            nodes.add(node)
        check(nodes == {"n1", "n2", "n3"}, f"one-shot execs spread over every node ({sorted(nodes)})")

        sandboxes = []
        for _ in range(6):
            status, node, body = c.call("POST", "/v1/sandboxes", {})
            sid = json.loads(body)["id"]
            check(status == 201 and sid.startswith(f"sbx_{node}_"), f"sandbox {sid} carries its node {node}")
            sandboxes.append((sid, node))
        for sid, node in sandboxes:
            status, answered, body = c.call("POST", f"/v1/sandboxes/{sid}/exec", {"code": f"x = {sid!r}"})
            check(status == 200 and answered == node, f"a call for {sid} reached {node}")
        # E2B's SDKs: the control plane by path, the sandbox calls by header.
        status, _, body = c.call("POST", "/v2/sandboxes", {"templateID": "base"}, {"X-API-KEY": KEY})
        e2b = json.loads(body)
        check(status == 201, "an E2B sandbox through the balancer")
        e2b_node = re.match(r"sbx_([a-z0-9]+)_", e2b["sandboxID"]).group(1)
        for _ in range(3):
            status, answered, _ = c.call("GET", "/health", headers={
                "E2b-Sandbox-Id": e2b["sandboxID"], "X-Access-Token": e2b["envdAccessToken"]})
            check(status == 204 and answered == e2b_node, f"an E2B sandbox call reached {e2b_node}")
        status, answered, _ = c.call("GET", f"/sandboxes/{e2b['sandboxID']}", headers={"X-API-KEY": KEY})
        check(status == 200 and answered == e2b_node, "E2B's sandbox info reached its node")

        # Node n2 dies under load: its sandboxes' calls fail cleanly, the
        # rest goes on.
        stop = threading.Event()
        results = []

        def load():
            while not stop.is_set():
                status, node, _ = c.call("POST", "/v1/exec", {"code": "print(1+1)"})
                results.append((time.time(), status, node))

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(2)
        killed_at = time.time()
        c.kill_node(2)
        time.sleep(3)
        stop.set()
        for w in workers:
            w.join()
        after = [(s, n) for t, s, n in results if t > killed_at + 1.0]
        failed = [(t - killed_at, s) for t, s, _ in results if s != 200]
        check(len(after) > 10 and all(s == 200 for s, _ in after),
              f"one-shot execs went on after the kill ({len(after)} after it, failures {failed})")
        check(all(n != "n2" for _, n in after), "nothing went to the dead node")
        for sid, node in sandboxes:
            status, _, body = c.call("POST", f"/v1/sandboxes/{sid}/exec", {"code": "print(x)"})
            if node == "n2":
                code = json.loads(body)["error"]["code"]
                check(status == 503 and code == "node_unavailable", f"{sid} on the dead node: 503 {code}")
            else:
                check(status == 200 and json.loads(body)["stdout"] == f"{sid}\n", f"{sid} on {node} still works")
    print("cluster test passed")


def bench(seconds, connections):
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {model}, {os.cpu_count()} cores; wrk -c{connections} -d{seconds}s, print(1+1) via /v1/exec")
    for n in (1, 2, 3):
        with Cluster(n) as c:
            for _ in range(10):  # warm every node's pool
                c.call("POST", "/v1/exec", {"code": "print(1+1)"})
            out = run("wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
                      "-H", f"Authorization: Bearer {KEY}", "-s", str(REPO / "scripts" / "load-exec.lua"),
                      f"http://127.0.0.1:{c.port}/v1/exec").stdout
            rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
            lat = re.search(r"p50 .*", out).group(0)
            errors = re.search(r"requests \d+, errors: .*", out).group(0)
            print(f"{n} node(s): {rps} requests/s; {lat}; {errors}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("test")
    b = sub.add_parser("bench")
    b.add_argument("--seconds", type=int, default=15)
    b.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("scripts/cluster.py needs root: it makes network namespaces")
    if not os.path.exists("/dev/kvm"):
        raise SystemExit("scripts/cluster.py needs /dev/kvm")
    if args.command == "test":
        test()
    else:
        bench(args.seconds, args.connections)


if __name__ == "__main__":
    sys.exit(main())
