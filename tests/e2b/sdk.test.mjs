// E2B's JavaScript SDKs (`e2b`, `@e2b/code-interpreter`, unmodified, from
// npm) against a real `zeroboot serve` and real guests, pointed at it by
// the three environment variables a user sets. Starts its own server from
// $ZEROBOOT_BIN (default: target/release/zeroboot), with a pause directory
// of its own.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'

const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const binary = process.env.ZEROBOOT_BIN ?? join(repo, 'target', 'release', 'zeroboot')
const pauseDir = mkdtempSync(join(tmpdir(), 'zeroboot-e2b-js-'))
let server

before(async () => {
  if (!existsSync(binary)) throw new Error(`${binary} is missing: build zeroboot first (cargo build --release)`)
  server = spawn(binary, ['serve', '--listen', '127.0.0.1:0', '--pool', '1', '--template', 'python',
    '--template', 'code-interpreter', '--pause-dir', pauseDir], { stdio: ['ignore', 'pipe', 'inherit'] })
  const url = await new Promise((resolve, reject) => {
    const lines = createInterface({ input: server.stdout })
    lines.on('line', (line) => {
      if (line.startsWith('zeroboot: listening on ')) resolve(line.split(' ').pop())
    })
    server.on('exit', () => reject(new Error('zeroboot serve exited before listening (is /dev/kvm there? are the templates built?)')))
  })
  // What a user of E2B's SDKs sets to use zeroboot instead.
  Object.assign(process.env, { E2B_API_KEY: 'any-key', E2B_API_URL: url, E2B_SANDBOX_URL: url })
})

after(() => {
  server?.kill()
  rmSync(pauseDir, { recursive: true, force: true })
})

test('a code-interpreter sandbox through its whole life', async () => {
  const { Sandbox } = await import('@e2b/code-interpreter')
  const started = performance.now()
  const sbx = await Sandbox.create()
  const first = await sbx.runCode('1 + 1')
  console.log(`Sandbox.create() + first runCode: ${(performance.now() - started).toFixed(1)} ms`)
  assert.equal(first.text, '2')

  await sbx.runCode('x = 41')
  const seen = []
  const ex = await sbx.runCode("import sys, time\nprint(x + 1)\nsys.stdout.flush()\ntime.sleep(0.3)\nprint('later', file=sys.stderr)", {
    onStdout: (m) => seen.push([performance.now(), m.line]),
    onStderr: (m) => seen.push([performance.now(), m.line]),
  })
  assert.deepEqual(ex.logs.stdout, ['42\n'])
  assert.deepEqual(seen.map(([, line]) => line), ['42\n', 'later\n'])
  assert.ok(seen[1][0] - seen[0][0] > 200, 'stdout came as it was written')

  const error = (await sbx.runCode('def f():\n    return 1 / 0\nf()')).error
  assert.equal(error.name, 'ZeroDivisionError')
  assert.match(error.traceback, /return 1 \/ 0/)

  const figure = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()')
  assert.ok(Buffer.from(figure.results[0].png, 'base64').subarray(0, 4).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])))
  const table = await sbx.runCode("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
  assert.match(table.results[0].html, /<table/)

  const ctx = await sbx.createCodeContext({ cwd: '/tmp' })
  assert.deepEqual((await sbx.runCode('import os\ny = os.getcwd()\nprint(y)', { context: ctx })).logs.stdout, ['/tmp\n'])
  assert.equal((await sbx.runCode("'y' in globals()")).text, 'False')
  await sbx.removeCodeContext(ctx)

  await sbx.files.write('/home/user/js/a.txt', 'hello')
  assert.equal(await sbx.files.read('/home/user/js/a.txt'), 'hello')
  assert.deepEqual((await sbx.files.list('/home/user/js')).map((e) => e.name), ['a.txt'])
  await sbx.files.remove('/home/user/js/a.txt')
  assert.equal(await sbx.files.exists('/home/user/js/a.txt'), false)

  const r = await sbx.commands.run('echo hi; whoami')
  assert.deepEqual([r.stdout, r.exitCode], ['hi\nuser\n', 0])
  assert.equal((await sbx.commands.run('whoami', { user: 'root' })).stdout, 'root\n')
  await assert.rejects(sbx.commands.run('exit 3'), (e) => e.exitCode === 3)

  await sbx.setTimeout(120_000)
  const listed = await Sandbox.list().nextItems()
  assert.ok(listed.some((s) => s.sandboxId === sbx.sandboxId))

  await sbx.betaPause()
  const states = Object.fromEntries((await Sandbox.list().nextItems()).map((s) => [s.sandboxId, s.state]))
  assert.equal(states[sbx.sandboxId], 'paused')
  const resumed = await Sandbox.connect(sbx.sandboxId)
  assert.equal((await resumed.runCode('x')).text, '41')
  await resumed.kill()
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
})

test('the base template runs commands', async () => {
  const { Sandbox } = await import('e2b')
  const sbx = await Sandbox.create('base')
  try {
    const r = await sbx.commands.run("python3 -c 'print(6 * 7)'")
    assert.equal(r.stdout, '42\n')
    assert.equal((await sbx.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
  } finally {
    await sbx.kill()
  }
})
