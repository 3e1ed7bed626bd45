'use strict';
// zeroboot guest agent for Node.js: PID 1 of a node template's guest
// (started by /zeroboot/init with the flags in guest/agent/init-node).
//
// Boot: mount the kernel filesystems, credit the host's boot entropy, load
// and warm up the preloaded modules, run the exec path once, then ring the
// READY doorbell. The host snapshots the VM at that store.
//
// Every fork resumes right after it, with a request in the mailbox. The code
// runs in this process like `node -e` code, its output captured in memory;
// the result goes back through the mailbox with one RESULT doorbell. The
// mailbox layout is defined in crates/protocol/src/lib.rs; zeroboot
// generates its constants into zeroboot_mailbox.js, next to this file.

const path = require('path');
const native = require('/zeroboot/zeroboot_node.node');

const T0 = process.hrtime.bigint();

// Generated from crates/protocol by zeroboot and installed next to this file.
const {
  MAILBOX_SIZE,
  MAGIC,
  VERSION,
  H,
  BOOT_SEED_LEN,
  REQUEST_SEED_LEN,
  REQUEST_OFFSET,
  RESPONSE_OFFSET,
  RESPONSE_CAPACITY,
  FLAG_STDOUT_TRUNCATED,
  FLAG_STDERR_TRUNCATED,
  FLAG_MORE,
  REQUEST_STREAM,
  REQUEST_FILE_OP,
  DOORBELL_READY,
  DOORBELL_RESULT,
  MAX_OUTPUT_LIMIT,
} = require(path.join(__dirname, 'zeroboot_mailbox.js'));

// The console, kept before the agent takes over process.stdout for requests.
const consoleWrite = process.stdout.write.bind(process.stdout);

function log(msg) {
  const s = Number(process.hrtime.bigint() - T0) / 1e9;
  consoleWrite(`zeroboot-agent: [${s.toFixed(2).padStart(7)}s] ${msg}\n`);
}

// --- randomness -------------------------------------------------------------
// V8 seeds Math.random once per process, so every fork would repeat the
// template's sequence. The agent replaces it with xoshiro128** reseeded from
// the host's per-request seed; OpenSSL (crypto.*) is reseeded from it too.
const rngState = new Uint32Array(4);
function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}
function nextU32() {
  const s = rngState;
  const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
  const t = s[1] << 9;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 11);
  return result;
}
function random() {
  // 53 random bits, as V8's own Math.random gives.
  return ((nextU32() >>> 5) * 67108864 + (nextU32() >>> 6)) / 9007199254740992;
}
function reseed(seed) {
  for (let i = 0; i < 4; i++) rngState[i] = seed.readUInt32LE(4 * i);
  if (!(rngState[0] | rngState[1] | rngState[2] | rngState[3])) rngState[0] = 1;
  native.seedOpenssl(seed);
}

// --- output capture -----------------------------------------------------------
const STREAM_INTERVAL_MS = 5;
const STREAM_PROMPT_MS = 20;

class Capture {
  constructor(limit, onLine) {
    this.pending = [];
    this.room = limit;
    this.truncated = false;
    this.onLine = onLine;
  }
  write(chunk, encoding) {
    // What child processes wrote before this comes before it.
    if (children.active) children.collect();
    const b = Buffer.isBuffer(chunk) || chunk instanceof Uint8Array
      ? Buffer.from(chunk)
      : Buffer.from(String(chunk), typeof encoding === 'string' ? encoding : 'utf8');
    this.keep(b);
    if (this.onLine && b.includes(10)) this.onLine();
  }
  keep(b) {
    if (b.length > this.room) {
      b = b.subarray(0, this.room);
      this.truncated = true;
    }
    this.room -= b.length;
    if (b.length) this.pending.push(b);
  }
  take() {
    const b = Buffer.concat(this.pending);
    this.pending = [];
    return b;
  }
}

// --- child processes ------------------------------------------------------------
// The console is fds 1 and 2, and it drops what a child writes to it; so
// when code first starts a child (any child_process function), fds 1 and 2
// become files (zb_capture_child_output in native/guest.h), and from then on
// this sandbox reads them into the request's captures: before each write of
// the code's own, while the agent waits for the code's work, and at the end
// of each request. A request that starts no child, in a sandbox that never
// started one, pays for none of it.
const fs = require('fs');
const children = {
  active: false,
  fds: null,
  at: [0, 0],
  buffer: null,
  spawning() {
    if (!this.active) {
      try {
        this.fds = native.captureChildOutput();
      } catch {
        return; // children write to the console, as before
      }
      this.buffer = Buffer.alloc(1 << 16);
      this.active = true;
    }
    if (current && current.pump) current.pump();
  },
  // Moves what children wrote since the last call into the captures.
  collect() {
    for (let i = 0; i < 2; i++) {
      const capture = current && current[i ? 'err' : 'out'];
      let lines = false;
      for (;;) {
        const n = fs.readSync(this.fds[i], this.buffer, 0, this.buffer.length, this.at[i]);
        if (!n) break;
        this.at[i] += n;
        if (!capture) continue;
        const b = Buffer.from(this.buffer.subarray(0, n));
        capture.keep(b);
        lines ||= b.includes(10);
      }
      if (lines && capture.onLine) capture.onLine();
    }
  },
  // Collects the rest and empties the files; a child still running goes on
  // writing at their new end.
  endRequest() {
    this.collect();
    for (let i = 0; i < 2; i++) {
      fs.ftruncateSync(this.fds[i], 0);
      this.at[i] = 0;
    }
  },
};

function captureChildProcesses() {
  const childProcess = require('child_process');
  const wrap = (fn) => function (...args) {
    children.spawning();
    return fn.apply(this, args);
  };
  // Every asynchronous way (spawn, exec, execFile, fork) spawns through the
  // prototype; the synchronous ones do not.
  childProcess.ChildProcess.prototype.spawn = wrap(childProcess.ChildProcess.prototype.spawn);
  for (const name of ['spawnSync', 'execSync', 'execFileSync']) childProcess[name] = wrap(childProcess[name]);
}

class Responder {
  constructor(mailbox, doorbell, seq, limit) {
    this.mailbox = mailbox;
    this.view = new DataView(mailbox.buffer, mailbox.byteOffset, mailbox.byteLength);
    this.doorbell = doorbell;
    this.seq = seq;
    this.flags = 0;
    this.left = [limit, limit];
  }
  cap(b, stream, flag) {
    if (b.length > this.left[stream]) {
      b = b.subarray(0, this.left[stream]);
      this.flags |= flag;
    }
    this.left[stream] -= b.length;
    return b;
  }
  send(out, err, exitCode = 0, final = false) {
    out = this.cap(out, 0, FLAG_STDOUT_TRUNCATED);
    err = this.cap(err, 1, FLAG_STDERR_TRUNCATED);
    for (;;) {
      const o = out.subarray(0, RESPONSE_CAPACITY);
      const e = err.subarray(0, RESPONSE_CAPACITY - o.length);
      out = out.subarray(o.length);
      err = err.subarray(e.length);
      const last = !out.length && !err.length;
      if (last && !final && !o.length && !e.length) return;
      this.ring(o, e, exitCode, this.flags | (last && final ? 0 : FLAG_MORE));
      if (last) return;
    }
  }
  ring(o, e, exitCode, flags) {
    this.mailbox.set(o, RESPONSE_OFFSET);
    this.mailbox.set(e, RESPONSE_OFFSET + o.length);
    const v = this.view;
    v.setInt32(H.EXIT_CODE, exitCode, true);
    v.setUint32(H.STDOUT_LEN, o.length, true);
    v.setUint32(H.STDERR_LEN, e.length, true);
    v.setUint32(H.RESPONSE_FLAGS, flags, true);
    v.setUint32(H.RESPONSE_SEQ, this.seq, true);
    // The host reads the chunk at this store, then resumes us for the next
    // chunk or, with a new request already written, for that.
    this.doorbell[0] = DOORBELL_RESULT;
  }
}

// --- running code like `node -e` ----------------------------------------------
const vm = require('vm');
const Module = require('module');
const util = require('util');

class ExitRequest {
  constructor(code) {
    this.code = code;
  }
}

let current = null; // the request being served: {out, err, failure}

// Stack frames of the agent itself, which `node -e` would not show.
const AGENT_FRAME = new RegExp(`^\\s+at .*(node:vm:|${__filename.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')})`);

function describe(e) {
  if (e instanceof Error && e.stack) {
    return `${e.stack.split('\n').filter((line) => !AGENT_FRAME.test(line)).join('\n')}\n`;
  }
  return `Uncaught ${util.inspect(e)}\n`;
}

function installGlobals() {
  // `node -e` code sees require, module, exports, __filename, __dirname and
  // every builtin module by name; so does ours.
  const filename = '/[eval]';
  const mod = new Module(filename, null);
  mod.filename = filename;
  mod.paths = Module._nodeModulePaths('/');
  const req = Module.createRequire(filename);
  Object.assign(globalThis, { require: req, module: mod, exports: mod.exports, __filename: '[eval]', __dirname: '.' });
  for (const name of Module.builtinModules) {
    // `crypto` is also WebCrypto's global in newer Node; `node -e` gives the module.
    if (name.startsWith('_') || name.includes('/') || (name in globalThis && name !== 'crypto')) continue;
    Object.defineProperty(globalThis, name, {
      configurable: true,
      enumerable: false,
      get() {
        const value = req(name);
        Object.defineProperty(globalThis, name, { configurable: true, writable: true, value });
        return value;
      },
      set(value) {
        Object.defineProperty(globalThis, name, { configurable: true, writable: true, enumerable: true, value });
      },
    });
  }
  installStdin();
  Math.random = random;
  const crypto = require('crypto');
  // randomUUID keeps a cache of random bytes that forks of a live sandbox
  // would share; take fresh bytes every time.
  const randomUUID = crypto.randomUUID;
  crypto.randomUUID = (options) => randomUUID({ ...options, disableEntropyCache: true });
  process.exit = (code) => {
    throw new ExitRequest(code === undefined ? process.exitCode : code);
  };
  // The console is a terminal, but the code's output is not: no colours,
  // as under `node -e` with its output piped.
  process.stdout.isTTY = false;
  process.stderr.isTTY = false;
  const capture = (stream) => (chunk, encoding, cb) => {
    if (current) current[stream].write(chunk, encoding);
    if (typeof encoding === 'function') encoding();
    else if (typeof cb === 'function') cb();
    return true;
  };
  process.stdout.write = capture('out');
  process.stderr.write = capture('err');
  // Errors that escape the code after it returned (a timer, a promise)
  // fail the request as they would fail `node -e`.
  const escaped = (e) => {
    if (!current) return;
    if (e instanceof ExitRequest) {
      current.exit = e.code;
    } else {
      current.err.write(describe(e));
      current.failed = true;
    }
  };
  process.on('uncaughtException', escaped);
  process.on('unhandledRejection', escaped);
}

function exitCodeOf(code) {
  const n = Number(code ?? 0);
  return Number.isInteger(n) ? Math.max(-(2 ** 31), Math.min(2 ** 31 - 1, n)) : 1;
}

let baseline = 0;
function userWorkPending() {
  return process.getActiveResourcesInfo().length > baseline;
}

async function runCode(code) {
  let value;
  try {
    value = vm.runInThisContext(code, { filename: '[eval]', importModuleDynamically: undefined });
    if (value && typeof value.then === 'function') await value;
  } catch (e) {
    if (e instanceof ExitRequest) {
      current.exit = e.code;
    } else {
      current.err.write(describe(e));
      current.failed = true;
    }
  }
  // Timers and I/O the code started run to completion, as under `node -e`,
  // unless it exited; the host's deadline bounds the wait. process.stdin
  // delivers its data on the next turns of the event loop.
  for (let turn = 0; current.readsStdin && turn < 3; turn++) await new Promise((resolve) => setImmediate(resolve));
  while (current.exit === undefined && userWorkPending()) {
    await new Promise((resolve) => setTimeout(resolve, 2));
    if (children.active) children.collect();
  }
  if (current.exit !== undefined) return exitCodeOf(current.exit);
  if (current.failed) return 1;
  return exitCodeOf(process.exitCode);
}

async function handleRequest(mailbox, doorbell) {
  const view = new DataView(mailbox.buffer, mailbox.byteOffset, mailbox.byteLength);
  // The files API's requests: answered by the native half until code comes.
  if (view.getUint32(H.REQUEST_FLAGS, true) & REQUEST_FILE_OP) native.serveFileOps(mailbox.buffer, doorbell.buffer);
  const seq = view.getUint32(H.REQUEST_SEQ, true);
  const codeLen = view.getUint32(H.CODE_LEN, true);
  const stdinLen = view.getUint32(H.STDIN_LEN, true);
  const limit = Math.min(view.getUint32(H.OUTPUT_LIMIT, true), MAX_OUTPUT_LIMIT);
  const stream = view.getUint32(H.REQUEST_FLAGS, true) & REQUEST_STREAM;
  const contextLen = view.getUint32(H.CONTEXT_LEN, true);
  const responder = new Responder(mailbox, doorbell, seq, limit);
  let exitCode;
  // In stream mode, what was written goes out when a line completes, at
  // most once per STREAM_INTERVAL_MS (each send is a VM exit). What that
  // holds back, and what children write, an unreferenced timer (which keeps
  // no request waiting) sends within STREAM_PROMPT_MS while the code waits
  // on the event loop. The first line goes at once.
  let lastSend = -Infinity;
  let pumping = null;
  const sendNow = () => {
    lastSend = performance.now();
    responder.send(request.out.take(), request.err.take());
  };
  const pump = () => {
    if (pumping || request !== current) return;
    pumping = setInterval(() => {
      if (request !== current) return;
      if (children.active) children.collect();
      if (request.out.pending.length || request.err.pending.length) sendNow();
    }, STREAM_PROMPT_MS);
    pumping.unref();
  };
  const onLine = stream
    ? () => {
        if (performance.now() - lastSend >= STREAM_INTERVAL_MS) sendNow();
        else pump();
      }
    : null;
  const request = {
    out: new Capture(limit, onLine),
    err: new Capture(limit, onLine),
    exit: undefined,
    failed: false,
    pump: stream ? pump : null,
  };
  current = request;
  process.exitCode = undefined;
  let context = null;
  try {
    reseed(Buffer.from(mailbox.subarray(H.REQUEST_SEED, H.REQUEST_SEED + REQUEST_SEED_LEN)));
    if (REQUEST_OFFSET + codeLen + stdinLen + contextLen > RESPONSE_OFFSET) {
      throw new Error('request larger than the mailbox');
    }
    const code = Buffer.from(mailbox.subarray(REQUEST_OFFSET, REQUEST_OFFSET + codeLen)).toString('utf8');
    stdinText = Buffer.from(mailbox.subarray(REQUEST_OFFSET + codeLen, REQUEST_OFFSET + codeLen + stdinLen));
    if (contextLen) {
      const at = REQUEST_OFFSET + codeLen + stdinLen;
      context = new RequestContext(Buffer.from(mailbox.subarray(at, at + contextLen)));
    }
    exitCode = context && !context.enter(current.err) ? 1 : await runCode(code);
  } catch (e) {
    // The agent must survive anything.
    current.err.write(`zeroboot agent error: ${describe(e)}`);
    exitCode = 1;
  }
  if (context) context.leave();
  if (pumping) clearInterval(pumping);
  if (children.active) children.endRequest();
  if (current.out.truncated) responder.flags |= FLAG_STDOUT_TRUNCATED;
  if (current.err.truncated) responder.flags |= FLAG_STDERR_TRUNCATED;
  const out = current.out.take();
  const err = current.err.take();
  current = null;
  responder.send(out, err, exitCode, true);
}

// Who code runs as unless a request says (zb_switch_user in
// native/guest.h, which keeps 0 as the saved user ID so that a request can
// ask for root), and the environment each user gets.
const USER_UID = 1000;
const USERS = { user: [USER_UID, '/home/user', 'user'], root: [0, '/root', 'root'] };
let currentUid = 0;
function switchUser(uid) {
  const errno = native.switchUser(uid);
  if (errno === 0) currentUid = uid;
  return errno;
}

// A request's working directory, user and environment (see H.CONTEXT_LEN),
// over the sandbox's own for the length of the request.
class RequestContext {
  constructor(raw) {
    const records = raw.toString('utf8').split('\0');
    this.cwd = records[0];
    this.user = records.length > 2 && records[1] ? USERS[records[1]] : undefined;
    this.env = records.slice(2, -1).map((record) => {
      const at = record.indexOf('=');
      return [record.slice(0, at), record.slice(at + 1)];
    });
    this.savedEnv = new Map();
    this.savedCwd = null;
    this.savedUid = null;
  }
  setEnv(name, value) {
    if (!this.savedEnv.has(name)) this.savedEnv.set(name, process.env[name]);
    process.env[name] = value;
  }
  // Returns false, with the reason on `err`, if the code cannot run.
  enter(err) {
    if (this.user && this.user[0] !== currentUid) {
      const [uid, home, name] = this.user;
      const previous = currentUid;
      const errno = switchUser(uid);
      if (errno) {
        err.write(`zeroboot: user ${name}: errno ${errno}\n`);
        return false;
      }
      this.savedUid = previous;
      for (const [key, value] of [['HOME', home], ['USER', name], ['LOGNAME', name]]) this.setEnv(key, value);
    }
    for (const [name, value] of this.env) this.setEnv(name, value);
    if (this.cwd) {
      try {
        this.savedCwd = process.cwd();
        process.chdir(this.cwd);
      } catch (e) {
        err.write(`zeroboot: cwd ${this.cwd}: ${e.code === 'ENOENT' ? 'No such file or directory' : e.message}\n`);
        return false;
      }
    }
    return true;
  }
  leave() {
    if (this.savedUid !== null) switchUser(this.savedUid);
    for (const [name, value] of this.savedEnv) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    if (this.savedCwd !== null) {
      try {
        process.chdir(this.savedCwd);
      } catch {
        // gone meanwhile: stay where the code left us
      }
    }
  }
}

// The request's stdin. fd 0 is the console, so the agent serves it to the
// ways code reads stdin: process.stdin, fs.readFileSync(0) and
// fs.readFileSync('/dev/stdin').
let stdinText = Buffer.alloc(0);
function installStdin() {
  const fs = require('fs');
  const { Readable } = require('stream');
  let stream = null;
  let streamFor = null;
  Object.defineProperty(process, 'stdin', {
    configurable: true,
    enumerable: true,
    get() {
      if (current) current.readsStdin = true;
      if (streamFor !== stdinText) {
        streamFor = stdinText;
        stream = Readable.from(stdinText.length ? [stdinText] : []);
        stream.fd = 0;
        stream.isTTY = false;
      }
      return stream;
    },
  });
  const readFileSync = fs.readFileSync;
  fs.readFileSync = function (path, options) {
    if (path === 0 || path === '/dev/stdin') {
      const enc = typeof options === 'string' ? options : options && options.encoding;
      return enc ? stdinText.toString(enc) : Buffer.from(stdinText);
    }
    return readFileSync.apply(this, arguments);
  };
}

async function rehearse() {
  // Serves a few requests from a scratch mailbox, through the same code as
  // real ones, so the exec path is compiled and its pages mapped before
  // the snapshot.
  const scratch = new Uint8Array(MAILBOX_SIZE);
  const bell = new Uint8Array(1);
  const view = new DataView(scratch.buffer);
  const codes = ['console.log(1+1)', 'process.exit(3)', 'throw new Error("x")', 'console.error(Math.random())'];
  for (let i = 0; i < codes.length; i++) {
    const payload = Buffer.from(codes[i]);
    scratch.set(payload, REQUEST_OFFSET);
    view.setUint32(H.REQUEST_SEQ, i + 1, true);
    view.setUint32(H.CODE_LEN, payload.length, true);
    view.setUint32(H.STDIN_LEN, 0, true);
    view.setUint32(H.OUTPUT_LIMIT, 1 << 20, true);
    view.setUint32(H.REQUEST_FLAGS, i % 2 ? REQUEST_STREAM : 0, true);
    scratch.set(require('crypto').randomBytes(REQUEST_SEED_LEN), H.REQUEST_SEED);
    await handleRequest(scratch, bell);
    if (view.getUint32(H.RESPONSE_SEQ, true) !== i + 1) throw new Error('the rehearsal request got no response');
  }
}

function applyConfig() {
  const fs = require('fs');
  let config = {};
  try {
    config = JSON.parse(fs.readFileSync('/zeroboot/config.json', 'utf8'));
  } catch (e) {
    log(`no config (${e.message}): defaults`);
  }
  process.env.PATH ??= '/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin';
  // The kernel starts init with HOME=/.
  const [, home, name] = USERS.user;
  Object.assign(process.env, { HOME: home, USER: name, LOGNAME: name });
  process.chdir(home);
  Object.assign(process.env, config.env || {});
  return config;
}

// Builtins every fork finds loaded; a require in a fork reads files through
// the guest kernel, which is slow where guest kernel mode is emulated.
const PRELOADED = [
  'assert', 'buffer', 'child_process', 'crypto', 'events', 'fs', 'os', 'path', 'querystring',
  'stream', 'string_decoder', 'timers', 'url', 'util', 'zlib',
];

async function main() {
  const failed = native.mountKernelFilesystems();
  log(`filesystems mounted${failed ? ` (${failed} failed)` : ''}`);
  const mailboxGpa = native.cmdlineNumber('zeroboot.mailbox');
  const doorbellGpa = native.cmdlineNumber('zeroboot.doorbell');
  const mailbox = new Uint8Array(native.mapPhysical(mailboxGpa, MAILBOX_SIZE));
  const doorbell = new Uint8Array(native.mapPhysical(doorbellGpa, 4096));
  const view = new DataView(mailbox.buffer);
  const magic = view.getUint32(H.MAGIC, true);
  const version = view.getUint32(H.VERSION, true);
  if (magic !== MAGIC || version !== VERSION) {
    throw new Error(`mailbox magic/version ${magic.toString(16)}/${version}, expected ${MAGIC.toString(16)}/${VERSION}`);
  }
  const seed = Buffer.from(mailbox.subarray(H.BOOT_SEED, H.BOOT_SEED + BOOT_SEED_LEN));
  const err = native.addEntropy(seed);
  if (err) log(`crediting boot entropy failed: errno ${err}`);
  mailbox.fill(0, H.BOOT_SEED, H.BOOT_SEED + BOOT_SEED_LEN);
  log('entropy seeded');
  const config = applyConfig();
  installGlobals();
  captureChildProcesses();
  for (const name of [...PRELOADED, ...(config.preload || [])]) require(name);
  if (config.warmup) {
    // The spec's own warm-up, in a function of its own (its declarations
    // stay local); a failure fails the template build, which shows this
    // console.
    const done = vm.runInThisContext(`(function () {\n${config.warmup}\n})()`, { filename: '[template warmup]' });
    if (done && typeof done.then === 'function') await done;
  }
  log('modules preloaded');
  // What is open now (the console) is the agent's; anything more is the
  // code's, and a request waits for it to finish.
  baseline = process.getActiveResourcesInfo().length;
  await rehearse();
  baseline = process.getActiveResourcesInfo().length;
  // What the rehearsal touched moves onto 2 MiB pages: a fork maps each
  // with one fault instead of one per 4 KiB page.
  log(`huge pages: ${native.hugify()}`);
  // After the move (which would copy it) and while still root (pagemap).
  log(`fresh heap: ${native.mapFreshHeap(mailbox.buffer, config.heap_mib || 0)}`);
  // After everything that needs root.
  const errno = switchUser(USER_UID);
  if (errno) throw new Error(`cannot become uid ${USER_UID}: errno ${errno}`);
  log('ready');
  native.drainConsole();
  // The READY store is the snapshot: every fork resumes right after it, in
  // this loop, with its request already in the mailbox.
  doorbell[0] = DOORBELL_READY;
  for (;;) await handleRequest(mailbox, doorbell);
}

main().catch((e) => {
  log(describe(e));
  // PID 1 exiting panics the kernel, which resets the VM: the host sees it.
  process.reallyExit(1);
});
