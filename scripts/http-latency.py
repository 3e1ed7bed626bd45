#!/usr/bin/env python3
"""HTTP round-trip latency of one client that sends `print(1+1)` to a
running `zeroboot serve` at a steady pace, as an interactive user or agent
would (wrk sends back to back, which measures a saturated server instead).

    scripts/http-latency.py [--url http://127.0.0.1:8080] [--interval-ms 50] [--requests 120]

Prints p50/p90/p99 of the time from sending the request to reading the
whole response, leaving out the first 20 (warm-up)."""
import argparse
import http.client
import json
import time
import urllib.parse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--interval-ms", type=float, default=50)
    ap.add_argument("--requests", type=int, default=120)
    args = ap.parse_args()
    url = urllib.parse.urlparse(args.url)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80)
    body = json.dumps({"code": "print(1+1)"})
    times = []
    for _ in range(args.requests):
        time.sleep(args.interval_ms / 1000)
        start = time.perf_counter()
        conn.request("POST", "/v1/exec", body, {"content-type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        times.append((time.perf_counter() - start) * 1000)
        if response.status != 200 or json.loads(payload).get("stdout") != "2\n":
            raise SystemExit(f"unexpected response {response.status}: {payload[:200]!r}")
    times = sorted(times[20:]) if len(times) > 40 else sorted(times)
    pick = lambda p: times[min(len(times) - 1, int(len(times) * p))]
    print(
        f"{len(times)} requests, one every {args.interval_ms:g} ms: "
        f"p50 {pick(0.5):.2f} ms, p90 {pick(0.9):.2f} ms, p99 {pick(0.99):.2f} ms"
    )


if __name__ == "__main__":
    main()
