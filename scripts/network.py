#!/usr/bin/env python3
"""Sandboxes' network against real servers, on one machine.

A network namespace of the test's own stands for the internet: inside it,
at 10.213.T.2 and 10.213.T.3, an HTTP server (python3 -m http.server) and a
DNS server (Debian's dnsmasq) answering `allowed.test`, `denied.test`,
`sub.wild.test` (10.213.T.2) and `other.test` (10.213.T.3). A veth pair links
it to this host, whose side (10.213.T.1) also serves HTTP: a host address,
which no sandbox may reach whatever its policy. `zeroboot serve` runs here,
sending its sandboxes' DNS to that dnsmasq (--dns-upstream). Nothing outside
the namespace is contacted.

    scripts/network.py test     # the checks scripts/test.sh runs (needs root)
    scripts/network.py bench    # time to first byte, a 10 MiB download,
                                # what networking adds to a fork

Needs root (a network namespace), dnsmasq (scripts/install-deps.sh),
/dev/kvm and the python template (built by the tests before it).
"""

import argparse
import concurrent.futures
import json
import os
import statistics
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
TAG = os.getpid() % 200 + 20
NET = f"10.213.{TAG}"
INTERNET, OTHER, HOST = f"{NET}.2", f"{NET}.3", f"{NET}.1"
HELLO = "hello from the test namespace\n"
BIG_MIB = 10


def run(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """The namespace with its servers, and a zeroboot server; everything is
    removed on exit, also after a failure."""

    def __init__(self, server_args=(), pool=2):
        self.pool = pool
        self.dir = Path(tempfile.mkdtemp(prefix="zeroboot-network-"))
        self.ns = f"zbnet{TAG}"
        self.host_link = f"zbnet{TAG}h"
        self.procs = []
        self.server_args = list(server_args)
        self.port = None
        self.server = None

    def __enter__(self):
        try:
            self.add_namespace()
            self.start_services()
            self.start_server()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, failed=None, *_):
        if failed is not None and (self.dir / "server.log").exists():
            print("server log (last 30 lines):", file=sys.stderr)
            print("\n".join((self.dir / "server.log").read_text().splitlines()[-30:]), file=sys.stderr)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        run("ip", "netns", "del", self.ns, check=False)
        run("ip", "link", "del", self.host_link, check=False)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    def add_namespace(self):
        inside = f"zbnet{TAG}i"
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", inside, "netns", self.ns)
        run("ip", "addr", "add", f"{HOST}/24", "dev", self.host_link)
        run("ip", "link", "set", self.host_link, "up")
        for address in (INTERNET, OTHER):
            run("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{address}/24", "dev", inside)
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", inside, "up")
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")

    def spawn(self, name, args):
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_services(self):
        www = self.dir / "www"
        www.mkdir()
        (www / "hello.txt").write_text(HELLO)
        with open(www / "big.bin", "wb") as f:
            f.write(os.urandom(BIG_MIB << 20))
        for address in (INTERNET, OTHER):
            self.spawn(f"http-{address}", ["ip", "netns", "exec", self.ns, sys.executable, "-m", "http.server",
                                           "--bind", address, "--directory", str(www), "8000"])
        # A server on this host's side of the link: a host address.
        self.spawn("http-host", [sys.executable, "-m", "http.server", "--bind", HOST,
                                 "--directory", str(www), "8001"])
        self.dns_log = self.dir / "dnsmasq-queries.log"
        self.spawn("dnsmasq", [
            "ip", "netns", "exec", self.ns, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={INTERNET}", "--port=53", "--log-queries",
            f"--log-facility={self.dns_log}", f"--pid-file={self.dir / 'dnsmasq.pid'}",
            f"--address=/allowed.test/{INTERNET}", f"--address=/denied.test/{INTERNET}",
            f"--address=/sub.wild.test/{INTERNET}", f"--address=/other.test/{OTHER}"])
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://{INTERNET}:8000/hello.txt", timeout=2) as r:
                    if r.read().decode() == HELLO:
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("the test namespace's HTTP server did not start")

    def start_server(self):
        self.port = free_port()
        self.server = self.spawn("server", [
            BINARY, "serve", "--listen", f"127.0.0.1:{self.port}", "--pool", str(self.pool), "--no-pause",
            "--dns-upstream", f"{INTERNET}:53", *self.server_args])
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.server.poll() is not None:
                raise SystemExit(f"server exited: {(self.dir / 'server.log').read_text()}")
            if "listening on" in (self.dir / "server.log").read_text():
                return
            time.sleep(0.1)
        raise SystemExit("server did not start")

    def call(self, method, path, body=None, timeout=120):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def exec(self, code, network=None, timeout=30):
        body = {"code": code, "timeout_seconds": timeout}
        if network is not None:
            body["network"] = network
        status, out = self.call("POST", "/v1/exec", body)
        if status != 200:
            raise SystemExit(f"exec answered {status}: {out}")
        return out

    def dns_queries(self):
        return self.dns_log.read_text() if self.dns_log.exists() else ""


def check(cond, what):
    if not cond:
        raise SystemExit(f"network test FAILED: {what}")
    print(f"ok: {what}")


# Guest code: one line of JSON on stdout saying what happened and how long it took.
PROBE = """
import json, socket, time, urllib.request
def probe(kind, target):
    started = time.perf_counter()
    try:
        if kind == "get":
            with urllib.request.urlopen(target, timeout=10) as r:
                what = "ok:" + r.read().decode()
        elif kind == "resolve":
            what = "ok:" + socket.gethostbyname(target)
        else:
            host, port = target.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=10).close()
            what = "ok"
    except Exception as e:
        what = type(e).__name__ + ":" + str(e)
    return {"what": what, "ms": (time.perf_counter() - started) * 1e3}
"""


def probes(world, network, *checks):
    code = PROBE + "print(json.dumps([" + ", ".join(f"probe({k!r}, {t!r})" for k, t in checks) + "]))"
    out = world.exec(code, network)
    if out["exit_code"] != 0:
        raise SystemExit(f"probe failed: {out['stderr']}")
    return json.loads(out["stdout"])


def refused_fast(result):
    return not result["what"].startswith("ok") and result["ms"] < 1000


def test_template_policy():
    """A template's spec can give its sandboxes a policy, used when a
    request brings none; a request's own replaces it."""
    subprocess.run([BINARY, "template", "build", "-f", str(REPO / "tests" / "templates" / "network.toml")],
                   check=True, stdout=subprocess.DEVNULL)
    with World(["--template", "python", "--template", "test-network"]) as w:
        code = PROBE + f"print(probe('connect', '{INTERNET}:8000')['what'])"

        def run_on(template, network=None):
            body = {"code": code, "template": template}
            if network is not None:
                body["network"] = network
            status, out = w.call("POST", "/v1/exec", body)
            check(status == 200, f"exec on {template} answered {status}: {out}")
            return out["stdout"].strip()

        check(run_on("test-network") == "ok", "a template's own policy holds when a request brings none")
        check(run_on("test-network", {"allow": ["10.99.0.0/16"]}) != "ok", "a request's policy replaces the template's")
        check(run_on("python") != "ok", "a template without a policy gives no network")
        status, made = w.call("POST", "/v1/sandboxes", {"template": "test-network"})
        check(status == 201, f"a session of that template is made ({status})")
        status, out = w.call("POST", f"/v1/sandboxes/{made['id']}/exec", {"code": code})
        check(out["stdout"].strip() == "ok", f"a session of it has the template's policy ({out})")
        w.call("DELETE", f"/v1/sandboxes/{made['id']}")


def test(forks):
    test_template_policy()
    with World() as w:
        hello = f"http://{INTERNET}:8000/hello.txt"

        r = probes(w, None, ("get", hello), ("resolve", "allowed.test"))
        check(refused_fast(r[0]) and "refused" in r[0]["what"].lower(),
              f"without a network a connection is refused at once ({r[0]})")
        check(refused_fast(r[1]), f"without a network a name does not resolve, at once ({r[1]})")

        r = probes(w, {"allow": [f"{NET}.0/24"]}, ("get", hello))
        check(r[0]["what"] == "ok:" + HELLO, f"an allowed CIDR is reachable ({r[0]['ms']:.1f} ms)")

        r = probes(w, {"allow": ["10.99.0.0/16"]}, ("get", hello), ("connect", f"{OTHER}:8000"))
        check(all(refused_fast(x) and "refused" in x["what"].lower() for x in r),
              f"addresses outside the allowed CIDR are refused at once ({r})")

        r = probes(w, {"allow": ["*"]}, ("connect", f"{HOST}:8001"), ("connect", "169.254.169.254:80"),
                   ("connect", "10.0.2.2:80"), ("get", hello))
        check(all(refused_fast(x) for x in r[:3]),
              f"with everything allowed, the host, the metadata address and the gateway are refused ({r[:3]})")
        check(r[3]["what"] == "ok:" + HELLO, "with everything allowed, the test namespace is reachable")

        before = w.dns_queries()
        r = probes(w, {"allow": ["allowed.test", "*.wild.test"]},
                   ("get", "http://allowed.test:8000/hello.txt"), ("get", "http://sub.wild.test:8000/hello.txt"),
                   ("resolve", "other.test"), ("resolve", "wild.test"), ("connect", f"{OTHER}:8000"))
        check(r[0]["what"] == "ok:" + HELLO and r[1]["what"] == "ok:" + HELLO,
              "allowed names (exact and wildcard) resolve through the test's DNS server and connect")
        check(refused_fast(r[2]) and refused_fast(r[3]), f"names the policy does not allow do not resolve ({r[2:4]})")
        asked = w.dns_queries()[len(before):]
        check("allowed.test" in asked and "other.test" not in asked,
              "a name the policy does not allow never reaches the DNS server")
        check(refused_fast(r[4]), f"an address no allowed name resolved to is refused ({r[4]})")

        r = probes(w, {"allow": ["allowed.test"]}, ("connect", f"{INTERNET}:8000"))
        check(refused_fast(r[0]), "a domain rule does not let through an address resolved elsewhere")

        r = probes(w, {"allow": ["*"], "deny": ["denied.test", f"{OTHER}/32"]},
                   ("resolve", "denied.test"), ("connect", f"{OTHER}:8000"), ("get", hello))
        check(refused_fast(r[0]) and refused_fast(r[1]) and r[2]["what"] == "ok:" + HELLO,
              f"deny entries win over allow entries ({r})")

        status, body = w.call("POST", "/v1/exec", {"code": "1", "network": {"allow": ["ok.test", "10.0.0.0/33"]}})
        check(status == 400 and "network.allow[1]" in body["error"]["message"],
              f"a malformed policy is a 400 naming the entry ({status} {body})")
        status, body = w.call("POST", "/v1/exec", {"code": "1", "network": {"allow": [], "allowed": []}})
        check(status == 422 and "allowed" in body["error"]["message"],
              f"an unknown policy field is refused as the API refuses any bad field, naming it ({status} {body})")

        test_sessions_and_forks(w)
        test_sandboxes_apart(w)
        test_flood(w)
        test_many_forks_leave_nothing(w, forks)

    with World(["--no-network"]) as w:
        status, body = w.call("POST", "/v1/exec", {"code": "1", "network": {"allow": ["*"]}})
        check(status == 403 and body["error"]["code"] == "network_disabled",
              f"a server run with --no-network refuses a policy ({status})")
    print("network test passed")


def test_sessions_and_forks(w):
    status, session = w.call("POST", "/v1/sandboxes", {"network": {"allow": [f"{NET}.0/24"]}})
    check(status == 201, f"a session with a network is made ({status})")
    sid = session["id"]
    opened = ("import socket\n"
              f"conn = socket.create_connection(({INTERNET!r}, 8000), timeout=10)\n"
              "conn.sendall(b'GET /hello.txt HTTP/1.0\\r\\n')\nprint('open')")
    status, out = w.call("POST", f"/v1/sandboxes/{sid}/exec", {"code": opened})
    check(status == 200 and out["stdout"].strip() == "open", f"a session opens a connection ({out})")
    status, forked = w.call("POST", f"/v1/sandboxes/{sid}/fork", {"count": 1})
    check(status == 201, f"the session forks ({status} {forked})")
    child = forked["sandboxes"][0]["id"]
    use = ("try:\n    conn.sendall(b'\\r\\n')\n    data = conn.recv(1000)\n"
           "    print('shared' if b'hello' in data else 'closed')\n"
           "except OSError as e:\n    print(type(e).__name__)")
    status, out = w.call("POST", f"/v1/sandboxes/{child}/exec", {"code": use})
    check(status == 200 and out["stdout"].strip() != "shared",
          f"a child does not share its parent's connection ({out['stdout'].strip()})")
    status, out = w.call("POST", f"/v1/sandboxes/{child}/exec", {"code": PROBE + f"print(probe('get', 'http://{INTERNET}:8000/hello.txt')['what'])"})
    check(out["stdout"].strip() == "ok:" + HELLO.strip() or out["stdout"].strip() == "ok:" + HELLO,
          "the child makes connections of its own")
    status, out = w.call("POST", f"/v1/sandboxes/{sid}/exec", {"code": use})
    check(out["stdout"].strip() == "shared", f"the parent's connection still works ({out['stdout'].strip()})")
    for s in (sid, child):
        w.call("DELETE", f"/v1/sandboxes/{s}")


def fetch_big(w):
    code = (f"import time, urllib.request\nstarted = time.perf_counter()\n"
            f"n = len(urllib.request.urlopen('http://{INTERNET}:8000/big.bin', timeout=60).read())\n"
            "print(n, time.perf_counter() - started)")
    out = w.exec(code, {"allow": [f"{NET}.0/24"]}, timeout=120)
    n, seconds = out["stdout"].split()
    return int(n), float(seconds)


def test_sandboxes_apart(w):
    """A listener in one sandbox is out of another's reach: every sandbox is
    10.0.2.15 on a network of its own, and the gateway and host refuse."""
    sessions = []
    for _ in range(2):
        status, made = w.call("POST", "/v1/sandboxes", {"network": {"allow": ["*"]}})
        check(status == 201, f"a session with a network is made ({status})")
        sessions.append(made["id"])
    listen = ("import socket\nlistener = socket.socket()\n"
              "listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "listener.bind(('0.0.0.0', 7000)); listener.listen(8)\n" + PROBE +
              "print(json.dumps(probe('connect', '10.0.2.15:7000')))")
    status, out = w.call("POST", f"/v1/sandboxes/{sessions[0]}/exec", {"code": listen})
    check(status == 200 and json.loads(out["stdout"])["what"] == "ok",
          f"a sandbox listens on port 7000 and reaches itself there ({out})")
    code = PROBE + ("print(json.dumps([probe('connect', t) for t in "
                    f"('10.0.2.15:7000', '10.0.2.2:7000', '{HOST}:7000')]))")
    status, out = w.call("POST", f"/v1/sandboxes/{sessions[1]}/exec", {"code": code})
    r = json.loads(out["stdout"])
    check(all(refused_fast(x) for x in r), f"another sandbox cannot reach that listener by any address ({r})")
    for sid in sessions:
        w.call("DELETE", f"/v1/sandboxes/{sid}")


def test_flood(w):
    n, alone = fetch_big(w)
    check(n == BIG_MIB << 20, f"a {BIG_MIB} MiB download arrives whole ({alone:.2f} s)")
    flood = ("import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "end = time.time() + 4\nsent = 0\nwhile time.time() < end:\n"
             f"    try:\n        s.sendto(b'x' * 1400, ({INTERNET!r}, 9)); sent += 1\n"
             "    except OSError:\n        pass\nprint(sent)")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        flooding = pool.submit(w.exec, flood, {"allow": [f"{NET}.0/24"]})
        time.sleep(0.5)
        n, during = fetch_big(w)
        sent = flooding.result()["stdout"].strip()
    check(n == BIG_MIB << 20 and during < max(10 * alone, 5.0),
          f"a guest flooding packets ({sent} sent) slows only itself: another's download took {during:.2f} s "
          f"against {alone:.2f} s alone")


def server_resources(w):
    pid = w.server.pid
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children = run("pgrep", "-P", str(pid), check=False).stdout.split()
    links = len(run("ip", "-o", "link").stdout.splitlines())
    sockets = len(run("ss", "-Htan", check=False).stdout.splitlines())
    return fds, len(children), links, sockets


def test_many_forks_leave_nothing(w, count=1000):
    before = server_resources(w)
    code = PROBE + f"print(probe('connect', '{INTERNET}:8000')['what'])"
    failures = []

    def one(_):
        out = w.exec(code, {"allow": [f"{NET}.0/24"]})
        if out["stdout"].strip() != "ok":
            failures.append(out)

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))
    elapsed = time.time() - started
    check(not failures, f"{count} forks with networking each connected ({elapsed:.1f} s; failures: {failures[:2]})")
    time.sleep(1)
    after = server_resources(w)
    # The pool refills to its size; sockets in TIME_WAIT are the test
    # namespace's HTTP server's, not ours, and are not counted by -tan's
    # established ones alone, so compare with a margin for those.
    check(after[0] <= before[0] + 2 and after[1] <= before[1] and after[2] == before[2],
          f"{count} forks leave no descriptor, process or link behind (fds, workers, links: {before[:3]} -> {after[:3]})")


def bench(runs):
    # Without a pool every session's worker is a new child of the server.
    with World(pool=0) as w:
        allow = {"allow": [f"{NET}.0/24"]}
        memory = {
            "session_worker_anonymous_kib_without_network": session_memory(w, None, "print(1)"),
            "session_worker_anonymous_kib_with_network_after_a_get": session_memory(
                w, allow, PROBE + f"print(probe('get', 'http://{INTERNET}:8000/hello.txt')['what'])"),
        }
    with World() as w:
        allow = {"allow": [f"{NET}.0/24"]}
        ttfb_code = (f"import socket, time\nstarted = time.perf_counter()\n"
                     f"s = socket.create_connection(({INTERNET!r}, 8000))\n"
                     "s.sendall(b'GET /hello.txt HTTP/1.0\\r\\n\\r\\n')\ns.recv(1)\n"
                     "print((time.perf_counter() - started) * 1e3)")
        ttfb, totals = [], []
        for _ in range(runs):
            out = w.exec(ttfb_code, allow)
            ttfb.append(float(out["stdout"]))
            totals.append(out["total_time_ms"])
        rates = []
        for _ in range(max(3, runs // 10)):
            n, seconds = fetch_big(w)
            rates.append(n / seconds / (1 << 20))
        spawn = {}
        for name, network in (("without", None), ("with", allow)):
            spawn[name] = [w.exec("pass", network)["fork_time_ms"] for _ in range(runs)]
        print(json.dumps({
            **memory,
            "machine": run("sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").stdout.strip(),
            "ttfb_ms_p50": statistics.median(ttfb),
            "ttfb_ms_p90": sorted(ttfb)[int(len(ttfb) * 0.9)],
            "exec_with_first_get_total_ms_p50": statistics.median(totals),
            "download_10mib_mib_per_s_median": statistics.median(rates),
            "spawn_ms_p50_without_network": statistics.median(spawn["without"]),
            "spawn_ms_p50_with_network": statistics.median(spawn["with"]),
        }, indent=2))


def session_memory(w, network, code, samples=5):
    """Median anonymous memory (smaps_rollup Anonymous, KiB: the guest pages
    it copied on write, and the worker's own heap) of a session's worker
    process after `code` ran in it."""
    values = []
    for _ in range(samples):
        before = set(run("pgrep", "-P", str(w.server.pid), check=False).stdout.split())
        body = {} if network is None else {"network": network}
        status, made = w.call("POST", "/v1/sandboxes", body)
        if status != 201:
            raise SystemExit(f"session: {status} {made}")
        status, out = w.call("POST", f"/v1/sandboxes/{made['id']}/exec", {"code": code})
        if status != 200 or out["exit_code"] != 0:
            raise SystemExit(f"exec: {status} {out}")
        after = set(run("pgrep", "-P", str(w.server.pid), check=False).stdout.split())
        new = sorted(after - before, key=int)
        if len(new) != 1:
            raise SystemExit(f"expected one new worker, found {new}")
        rollup = Path(f"/proc/{new[0]}/smaps_rollup").read_text()
        fields = dict(line.split(":", 1) for line in rollup.splitlines()[1:])
        values.append(int(fields["Anonymous"].split()[0]))
        w.call("DELETE", f"/v1/sandboxes/{made['id']}")
    return statistics.median(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("test")
    t.add_argument("--forks", type=int, default=1000, help="forks with a network in the check that they leave nothing behind")
    b = sub.add_parser("bench")
    b.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("scripts/network.py needs root (network namespaces)")
    if args.command == "test":
        test(args.forks)
    else:
        bench(args.runs)


if __name__ == "__main__":
    main()
