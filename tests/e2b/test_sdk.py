"""E2B's Python SDKs (`e2b`, `e2b-code-interpreter`, unmodified, from PyPI)
against a real `zeroboot serve` and real guests, pointed at it by the three
environment variables a user sets. Starts its own server from
$ZEROBOOT_BIN (default: target/release/zeroboot), with a pause directory of
its own, and restarts it to show that a paused sandbox outlives it.
"""

import base64
import shutil
import tempfile
import time
import unittest

import zeroboot_server

PAUSE_DIR = tempfile.mkdtemp(prefix="zeroboot-e2b-sdk-")
_server = None


def start_server():
    global _server
    _server = zeroboot_server.start(PAUSE_DIR)


def stop_server():
    if _server is not None:
        zeroboot_server.stop(_server)


def setUpModule():
    start_server()


def tearDownModule():
    stop_server()
    shutil.rmtree(PAUSE_DIR, ignore_errors=True)


from e2b import Sandbox as BaseSandbox  # noqa: E402
from e2b.exceptions import NotFoundException  # noqa: E402
from e2b.sandbox.commands.command_handle import CommandExitException  # noqa: E402
from e2b_code_interpreter import Sandbox  # noqa: E402


class CodeInterpreter(unittest.TestCase):
    def test_the_whole_life_of_a_sandbox(self):
        started = time.perf_counter()
        sbx = Sandbox.create()
        first = sbx.run_code("1 + 1")
        print(f"\nSandbox.create() + first run_code: {(time.perf_counter() - started) * 1e3:.1f} ms")
        self.assertEqual(first.text, "2")

        # State across calls, output as it is written.
        sbx.run_code("x = 41")
        seen = []
        ex = sbx.run_code("import sys, time\nprint(x + 1)\nsys.stdout.flush()\ntime.sleep(0.3)\nprint('later', file=sys.stderr)",
                          on_stdout=lambda m: seen.append((time.perf_counter(), m.line)),
                          on_stderr=lambda m: seen.append((time.perf_counter(), m.line)))
        self.assertEqual(ex.logs.stdout, ["42\n"])
        self.assertEqual(ex.logs.stderr, ["later\n"])
        self.assertEqual([line for _, line in seen], ["42\n", "later\n"])
        self.assertGreater(seen[1][0] - seen[0][0], 0.2, "stdout came as it was written, before the sleep ended")

        # A Python error, with its traceback.
        ex = sbx.run_code("def f():\n    return 1 / 0\nf()")
        self.assertEqual((ex.error.name, ex.error.value), ("ZeroDivisionError", "division by zero"))
        self.assertIn("return 1 / 0", ex.error.traceback)

        # A figure as a PNG, a DataFrame as HTML.
        ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
        self.assertTrue(base64.b64decode(ex.results[0].png).startswith(b"\x89PNG"))
        ex = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
        self.assertIn("<table", ex.results[0].html)
        self.assertTrue(ex.results[0].is_main_result)

        # Contexts: namespaces of their own, with their own directory.
        ctx = sbx.create_code_context(cwd="/tmp")
        ex = sbx.run_code("import os\ny = os.getcwd()\nprint(y)", context=ctx)
        self.assertEqual(ex.logs.stdout, ["/tmp\n"])
        self.assertEqual(sbx.run_code("'y' in globals()").text, "False")
        self.assertEqual(sbx.run_code("y", context=ctx).text, "'/tmp'")
        self.assertIn(ctx.id, [c.id for c in sbx.list_code_contexts()])
        sbx.restart_code_context(ctx)
        self.assertEqual(sbx.run_code("y", context=ctx).error.name, "NameError")
        sbx.remove_code_context(ctx)

        # Files: write, read, list, remove.
        sbx.files.write("/home/user/data/a.txt", "hello")
        self.assertEqual(sbx.files.read("/home/user/data/a.txt"), "hello")
        self.assertEqual([e.name for e in sbx.files.list("/home/user/data")], ["a.txt"])
        self.assertTrue(sbx.files.exists("/home/user/data/a.txt"))
        self.assertEqual(sbx.run_code("open('/home/user/data/a.txt').read()").text, "'hello'")
        sbx.files.remove("/home/user/data/a.txt")
        self.assertFalse(sbx.files.exists("/home/user/data/a.txt"))

        # Commands: real output and exit code.
        r = sbx.commands.run("echo hi; whoami; echo warn >&2")
        self.assertEqual((r.stdout, r.stderr, r.exit_code), ("hi\nuser\n", "warn\n", 0))
        self.assertEqual(sbx.commands.run("whoami", user="root").stdout, "root\n")
        with self.assertRaises(CommandExitException) as caught:
            sbx.commands.run("exit 3")
        self.assertEqual(caught.exception.exit_code, 3)

        # Timeout, list, info.
        sbx.set_timeout(120)
        info = sbx.get_info()
        self.assertEqual(info.sandbox_id, sbx.sandbox_id)
        listed = Sandbox.list().next_items()
        self.assertIn(sbx.sandbox_id, [s.sandbox_id for s in listed])

        # Pause, restart the server, connect: the sandbox is as it was.
        sbx.beta_pause()
        states = {s.sandbox_id: s.state.value for s in Sandbox.list().next_items()}
        self.assertEqual(states[sbx.sandbox_id], "paused")
        stop_server()
        start_server()
        resumed = Sandbox.connect(sbx.sandbox_id)
        self.assertEqual(resumed.run_code("x").text, "41")
        self.assertEqual(resumed.commands.run("ls /home/user/data").exit_code, 0)

        resumed.kill()
        self.assertFalse(Sandbox.kill(sbx.sandbox_id))
        with self.assertRaises(NotFoundException):
            Sandbox.connect(sbx.sandbox_id)


class Base(unittest.TestCase):
    def test_the_base_template_runs_commands(self):
        sbx = BaseSandbox.create(template="base", metadata={"suite": "base"})
        try:
            r = sbx.commands.run("python3 -c 'print(6 * 7)' && bash -c 'echo $0'")
            self.assertEqual(r.stdout, "42\nbash\n")
            r = sbx.commands.run("pwd", cwd="/tmp", envs={"GREETING": "hi"})
            self.assertEqual(r.stdout, "/tmp\n")
            self.assertEqual(sbx.commands.run("echo $GREETING", envs={"GREETING": "hi"}).stdout, "hi\n")
            listed = BaseSandbox.list().next_items()
            self.assertEqual([s.metadata for s in listed if s.sandbox_id == sbx.sandbox_id], [{"suite": "base"}])
        finally:
            sbx.kill()


if __name__ == "__main__":
    unittest.main()
