// The TypeScript SDK (built to dist/) against a real `zeroboot serve`.
// Uses $ZEROBOOT_URL, or starts a server from $ZEROBOOT_BIN (default:
// target/release/zeroboot in this repository).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Sandbox, ZerobootError } from "../dist/index.js";

const repo = fileURLToPath(new URL("../../../", import.meta.url));
let server;
let url = process.env.ZEROBOOT_URL;

before(async () => {
  if (url) return;
  const bin = process.env.ZEROBOOT_BIN ?? `${repo}target/release/zeroboot`;
  if (!existsSync(bin)) throw new Error(`${bin} is missing: build zeroboot first (cargo build --release)`);
  server = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--pool", "2"], { stdio: ["ignore", "pipe", "inherit"] });
  url = await new Promise((resolve, reject) => {
    const lines = createInterface({ input: server.stdout });
    lines.on("line", (line) => {
      if (line.startsWith("zeroboot: listening on ")) resolve(line.split(" ").pop());
    });
    server.on("exit", () => reject(new Error("zeroboot serve exited before listening")));
  });
});

after(() => server?.kill());

test("run returns output, exit code and timings", async () => {
  const r = await new Sandbox({ url }).run("import sys\nprint(1+1)\nsys.exit(3)");
  assert.equal(r.stdout, "2\n");
  assert.equal(r.exit_code, 3);
  assert.ok(r.total_time_ms > 0);
});

test("errors are ZerobootErrors with codes", async () => {
  await assert.rejects(new Sandbox({ url }).run("1", { language: "cobol" }), (e) => {
    assert.ok(e instanceof ZerobootError);
    assert.equal(e.status, 400);
    assert.equal(e.code, "unsupported_language");
    return true;
  });
});

test("runBatch and timeouts", async () => {
  const [a, b] = await new Sandbox({ url }).runBatch(["print(1)", "while True: pass"], { timeoutSeconds: 0.5 });
  assert.equal(a.stdout, "1\n");
  assert.equal(b.timed_out, true);
});

test("stream yields lines then the result", async () => {
  const events = [];
  for await (const e of new Sandbox({ url }).stream("import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.05)")) {
    events.push(e);
  }
  assert.equal(events.filter((e) => e.kind === "stdout").map((e) => e.text).join(""), "0\n1\n2\n");
  assert.equal(events.at(-1).kind, "result");
});

test("results carry the last value and displays", async () => {
  const r = await new Sandbox({ url }).run("display({'a': 1})\n6 * 7");
  assert.deepEqual(r.results.map((x) => x.type), ["display_data", "execute_result"]);
  assert.equal(r.results[1].data["text/plain"], "42");
});

test("env, cwd and user reach the code", async () => {
  const sb = new Sandbox({ url });
  const code = "import os\nprint(os.getcwd(), os.environ['GREETING'])";
  assert.equal((await sb.run(code, { env: { GREETING: "hi" }, cwd: "/tmp" })).stdout, "/tmp hi\n");
  const uid = "import os\nprint(os.geteuid())";
  assert.equal((await sb.run(uid)).stdout, "1000\n");
  assert.equal((await sb.run(uid, { user: "root" })).stdout, "0\n");
  const s = await sb.session({ env: { GREETING: "session" }, cwd: "/usr" });
  assert.equal((await s.exec(code)).stdout, "/usr session\n");
  assert.equal((await s.exec(code, { env: { GREETING: "call" }, cwd: "/tmp" })).stdout, "/tmp call\n");
  await s.close();
});

test("sessions keep state, fork and move files", async () => {
  const sb = new Sandbox({ url });
  const s = await sb.session({ ttlSeconds: 60 });
  await s.exec("x = 41");
  const data = Uint8Array.from({ length: 1000 }, (_, i) => i % 256);
  await s.writeFile("/tmp/data.bin", data);
  assert.deepEqual(await s.readFile("/tmp/data.bin"), data);
  // The disk at /home/user: a stream up and down, metadata.
  const big = Uint8Array.from({ length: 10_000_000 }, (_, i) => (i * 7) % 256);
  const pieces = [big.subarray(0, 4_000_000), big.subarray(4_000_000)];
  await s.writeFile("/home/user/up/big.bin", new ReadableStream({
    pull(controller) {
      const next = pieces.shift();
      if (next) controller.enqueue(next);
      else controller.close();
    },
  }));
  const chunks = [];
  for await (const chunk of await s.readFileStream("/home/user/up/big.bin")) chunks.push(chunk);
  assert.deepEqual(Buffer.concat(chunks), Buffer.from(big));
  const info = await s.stat("/home/user/up/big.bin");
  assert.deepEqual([info.type, info.size, info.mode], ["file", big.length, 0o644]);
  await s.makeDir("/home/user/a/b");
  await s.rename("/home/user/up/big.bin", "/home/user/a/b/moved.bin");
  assert.deepEqual((await s.listDir("/home/user")).map((f) => [f.name, f.type]), [["a", "dir"], ["up", "dir"]]);
  await s.remove("/home/user/a");
  await assert.rejects(s.stat("/home/user/a"), (e) => e.status === 404 && e.code === "file_not_found");
  const [child] = await s.fork();
  await s.exec("x = 0");
  assert.equal((await child.exec("print(x + 1)")).stdout, "42\n");
  assert.ok((await sb.sessions()).some((i) => i.id === child.id));
  await child.close();
  await s.close();
  await assert.rejects(s.exec("1"), (e) => e.status === 404);
});

test("a paused sandbox is attached by id and resumed by its next call", async () => {
  const sb = new Sandbox({ url });
  const s = await sb.session();
  await s.exec("kept = 'yes'");
  assert.equal((await s.pause()).state, "paused");
  const attached = await new Sandbox({ url }).attach(s.id);
  assert.equal(attached.info.state, "paused");
  assert.equal((await attached.exec("print(kept)")).stdout, "yes\n");
  assert.equal((await sb.attach(s.id)).info.state, "running");
  await attached.close();
  await assert.rejects(sb.attach(s.id), (e) => e.status === 404);
});
