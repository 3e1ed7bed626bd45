"""The Python SDK against a real `zeroboot serve` and real guests.

Uses the server at $ZEROBOOT_URL, or starts one from $ZEROBOOT_BIN (default:
target/release/zeroboot in this repository) for the duration of the tests.
"""

import asyncio
import os
import subprocess
import unittest
from pathlib import Path

from zeroboot import AsyncSandbox, Sandbox, ZerobootError

REPO = Path(__file__).resolve().parents[3]
_server = None


def setUpModule():
    global _server
    if os.environ.get("ZEROBOOT_URL"):
        return
    binary = os.environ.get("ZEROBOOT_BIN", str(REPO / "target" / "release" / "zeroboot"))
    if not Path(binary).exists():
        raise RuntimeError(f"{binary} is missing: build zeroboot first (cargo build --release)")
    _server = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--pool", "2"], stdout=subprocess.PIPE, text=True
    )
    for line in _server.stdout:
        if line.startswith("zeroboot: listening on "):
            os.environ["ZEROBOOT_URL"] = line.split()[-1]
            break
    else:
        raise RuntimeError("zeroboot serve exited before listening")


def tearDownModule():
    if _server is not None:
        _server.terminate()
        _server.wait(timeout=30)


def client():
    return Sandbox(os.environ["ZEROBOOT_URL"])


class SyncTests(unittest.TestCase):
    def test_run_returns_output_exit_code_and_timings(self):
        r = client().run("import sys\nprint(1+1)\nsys.exit(3)")
        self.assertEqual((r.stdout, r.exit_code, r.timed_out), ("2\n", 3, False))
        self.assertGreater(r.total_time_ms, 0)

    def test_errors_are_exceptions_with_codes(self):
        with self.assertRaises(ZerobootError) as caught:
            client().run("print(1)", language="cobol")
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "unsupported_language"))

    def test_run_batch_and_timeout(self):
        results = client().run_batch(["print(1)", "while True: pass"], timeout_seconds=0.5)
        self.assertEqual(results[0].stdout, "1\n")
        self.assertTrue(results[1].timed_out)

    def test_stream_yields_lines_then_the_result(self):
        events = list(client().stream("import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.05)"))
        self.assertEqual("".join(e.text for e in events if e.kind == "stdout"), "0\n1\n2\n")
        self.assertEqual(events[-1].kind, "result")
        self.assertEqual(events[-1].result.exit_code, 0)

    def test_results_carry_the_last_value_and_displays(self):
        r = client().run("display({'a': 1})\n6 * 7")
        self.assertEqual([x["type"] for x in r.results], ["display_data", "execute_result"])
        self.assertEqual(r.results[1]["data"]["text/plain"], "42")

    def test_env_cwd_and_user_reach_the_code(self):
        sb = client()
        code = "import os\nprint(os.getcwd(), os.environ['GREETING'])"
        self.assertEqual(sb.run(code, env={"GREETING": "hi"}, cwd="/tmp").stdout, "/tmp hi\n")
        uid = "import os\nprint(os.geteuid())"
        self.assertEqual((sb.run(uid).stdout, sb.run(uid, user="root").stdout), ("1000\n", "0\n"))
        with sb.session(env={"GREETING": "session"}, cwd="/usr") as s:
            self.assertEqual(s.exec(code).stdout, "/usr session\n")
            self.assertEqual(s.exec(code, env={"GREETING": "call"}, cwd="/tmp").stdout, "/tmp call\n")
            self.assertEqual(s.exec(code).stdout, "/usr session\n")

    def test_session_keeps_state_forks_and_moves_files(self):
        sb = client()
        with sb.session(ttl_seconds=60) as s:
            s.exec("x = 41")
            s.write_file("/tmp/data.bin", bytes(range(256)) * 10)
            self.assertEqual(s.read_file("/tmp/data.bin"), bytes(range(256)) * 10)
            # The disk at /home/user: a file streamed up and down, metadata.
            import io, tempfile
            payload = bytes(range(256)) * 40_000
            with tempfile.TemporaryFile() as f:
                f.write(payload)
                f.seek(0)
                s.write_file("/home/user/up/big.bin", f)
            out = io.BytesIO()
            self.assertEqual(s.read_file_to("/home/user/up/big.bin", out), len(payload))
            self.assertEqual(out.getvalue(), payload)
            info = s.stat("/home/user/up/big.bin")
            self.assertEqual((info.type, info.size, info.mode), ("file", len(payload), 0o644))
            s.make_dir("/home/user/a/b")
            s.rename("/home/user/up/big.bin", "/home/user/a/b/moved.bin")
            self.assertEqual([(f.name, f.type) for f in s.list_dir("/home/user")], [("a", "dir"), ("up", "dir")])
            s.remove("/home/user/a")
            with self.assertRaises(ZerobootError) as missing:
                s.stat("/home/user/a")
            self.assertEqual((missing.exception.status, missing.exception.code), (404, "file_not_found"))
            with self.assertRaises(ZerobootError) as escaping:
                s.read_file("/home/user/../x")
            self.assertEqual(escaping.exception.status, 400)
            children = s.fork(2)
            s.exec("x = 0")
            for child in children:
                self.assertEqual(child.exec("print(x + 1)").stdout, "42\n")
                self.assertEqual(child.read_file("tmp/data.bin")[:3], b"\x00\x01\x02")
                child.close()
            self.assertIn(s.id, [i.id for i in sb.sessions()])
        with self.assertRaises(ZerobootError) as caught:
            s.exec("1")
        self.assertEqual(caught.exception.status, 404)

    def test_pause_and_attach_by_id(self):
        sb = client()
        s = sb.session()
        s.exec("kept = 'yes'")
        self.assertEqual(s.pause().state, "paused")
        self.assertEqual({i.id: i.state for i in sb.sessions()}[s.id], "paused")
        # Another client, by id alone: its first call resumes the sandbox.
        attached = client().attach(s.id)
        self.assertEqual(attached.info.state, "paused")
        self.assertEqual(attached.exec("print(kept)").stdout, "yes\n")
        self.assertEqual(client().attach(s.id).info.state, "running")
        attached.close()
        with self.assertRaises(ZerobootError) as caught:
            client().attach(s.id)
        self.assertEqual(caught.exception.status, 404)


class AsyncTests(unittest.TestCase):
    def test_async_surface(self):
        async def main():
            sb = AsyncSandbox(os.environ["ZEROBOOT_URL"])
            results = await asyncio.gather(sb.run("print('a')"), sb.run("print('b')"))
            self.assertEqual([r.stdout for r in results], ["a\n", "b\n"])
            texts = [e.text async for e in sb.stream("print('s')") if e.kind == "stdout"]
            self.assertEqual("".join(texts), "s\n")
            async with await sb.session() as s:
                await s.exec("y = 2")
                (child,) = await s.fork()
                self.assertEqual((await child.exec("print(y * 21)")).stdout, "42\n")
                await child.close()
                await s.pause()
                again = await sb.attach(s.id)
                self.assertEqual((await again.exec("print(y)")).stdout, "2\n")

        asyncio.run(main())


if __name__ == "__main__":
    unittest.main()
