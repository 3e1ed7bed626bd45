"""Times E2B's Python SDK against zeroboot: `Sandbox.create()` plus a first
`run_code("1 + 1")`, as a user of `e2b-code-interpreter` sees it, then the
same sandbox's next `run_code`, and `kill()`. Starts its own server.

    target/e2b-venv/bin/python tests/e2b/bench_sdk.py [--runs 50]

Then pauses a sandbox that has done some work and resumes it with
`Sandbox.connect` (runs/5 times). Prints the machine (as `zeroboot bench`
does) and medians and p90s in ms.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import zeroboot_server


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--template", default="code-interpreter-v1")
    args = parser.parse_args()
    paused = tempfile.mkdtemp(prefix="zeroboot-e2b-bench-")
    server = zeroboot_server.start(paused, pool=2)
    try:
        from e2b_code_interpreter import Sandbox

        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        print(f"machine: {model}, {os.cpu_count()} cores")
        first, second, kill = [], [], []
        for i in range(args.runs + 3):
            t0 = time.perf_counter()
            sbx = Sandbox.create(template=args.template)
            assert sbx.run_code("1 + 1").text == "2"
            t1 = time.perf_counter()
            assert sbx.run_code("2 + 2").text == "4"
            t2 = time.perf_counter()
            sbx.kill()
            t3 = time.perf_counter()
            if i >= 3:  # the first few fill the server's pools
                first.append((t1 - t0) * 1e3)
                second.append((t2 - t1) * 1e3)
                kill.append((t3 - t2) * 1e3)
            time.sleep(0.05)
        # Pause and resume a sandbox that has done some work.
        pause, resume, after, saved = [], [], [], []
        for i in range(max(3, args.runs // 5)):
            sbx = Sandbox.create(template=args.template)
            sbx.run_code("import numpy as np\nx = np.arange(100_000)")
            t0 = time.perf_counter()
            sbx.beta_pause()
            t1 = time.perf_counter()
            saved.append(sum(f.stat().st_size for f in Path(paused).rglob("*") if f.is_file()) / 2**20)
            resumed = Sandbox.connect(sbx.sandbox_id)
            t2 = time.perf_counter()
            assert resumed.run_code("int(x.sum())").text == "4999950000"
            t3 = time.perf_counter()
            resumed.kill()
            pause.append((t1 - t0) * 1e3)
            resume.append((t2 - t1) * 1e3)
            after.append((t3 - t2) * 1e3)
        print(f"paused sandbox on disk (after numpy.arange(100_000)): median {statistics.median(saved):.1f} MiB")
        for name, values in [("create + first run_code", first), ("next run_code", second), ("kill", kill),
                             ("beta_pause", pause), ("connect (resume)", resume),
                             ("first run_code after it", after)]:
            values.sort()
            p90 = values[int(len(values) * 0.9) - 1]
            print(f"{name:>24}: median {statistics.median(values):6.2f} ms, p90 {p90:6.2f} ms ({len(values)} runs)")
    finally:
        zeroboot_server.stop(server)
        shutil.rmtree(paused, ignore_errors=True)


if __name__ == "__main__":
    main()
