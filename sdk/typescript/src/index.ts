/**
 * Client for the zeroboot HTTP API (described at /v1/openapi.json).
 *
 *   const sb = new Sandbox({ url: "http://127.0.0.1:8080" });
 *   console.log((await sb.run("print(1+1)")).stdout);   // a new VM per call
 *   for await (const e of sb.stream("print('hi')")) console.log(e.kind, e.text);
 *   const s = await sb.session();                        // a long-lived sandbox
 *   await s.exec("x = 41");
 *   const [child] = await s.fork();                      // starts where s is now
 *
 * Uses only `fetch`.
 */

export interface ExecResult {
  id: string;
  stdout: string;
  stderr: string;
  exit_code: number;
  fork_time_ms: number;
  exec_time_ms: number;
  total_time_ms: number;
  timed_out: boolean;
  truncated: boolean;
  template: string;
  /** The exact bytes, base64, only where a stream is not valid UTF-8. */
  stdout_base64?: string;
  stderr_base64?: string;
  /** Rich results, as Jupyter gives them (images base64). */
  results: RichResult[];
}

/** The value of the code's last expression, or something it displayed. */
export interface RichResult {
  type: "execute_result" | "display_data";
  /** Representations by MIME type: `text/plain`, `text/html`, `image/png` (base64), ... */
  data: Record<string, unknown>;
}

/** A file, directory or link in a sandbox. */
export interface FileInfo {
  name: string;
  path: string;
  type: "file" | "dir" | "symlink" | "other";
  size: number;
  /** Permission bits, e.g. 0o644. */
  mode: number;
  /** Last modification, seconds since the epoch. */
  modified_unix: number;
}

export interface SandboxInfo {
  id: string;
  template: string;
  parent: string | null;
  ttl_seconds: number;
  idle_seconds: number;
  /** `running`, or `paused`: on the server's disk, without a VM; the next call resumes it. */
  state: "running" | "paused";
}

/** Where code runs and what environment it sees. */
export interface ContextOptions {
  /** Environment variables, over the sandbox's own. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
  /** Who the code runs as: "user" (uid 1000, the default) or "root". */
  user?: "user" | "root";
}

export interface RunOptions extends ContextOptions {
  language?: string;
  timeoutSeconds?: number;
  stdin?: string;
  template?: string;
}

function contextFields(o: ContextOptions) {
  return {
    ...(o.env && Object.keys(o.env).length ? { env: o.env } : {}),
    ...(o.cwd !== undefined ? { cwd: o.cwd } : {}),
    ...(o.user !== undefined ? { user: o.user } : {}),
  };
}

/** One event of a streamed run: `stdout`/`stderr` with `text`, then `result` or `error`. */
export interface StreamEvent {
  kind: "stdout" | "stderr" | "result" | "error";
  text?: string;
  result?: ExecResult;
  error?: ZerobootError;
}

/** An error the server answered with: `{error: {code, message}}`. */
export class ZerobootError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly retryAfter?: number,
  ) {
    super(`${status} ${code}: ${message}`);
    this.name = "ZerobootError";
  }
}

class Http {
  constructor(
    readonly url: string,
    readonly apiKey?: string,
  ) {}

  async request(method: string, path: string, body?: BodyInit, contentType?: string, accept = "application/json") {
    const headers: Record<string, string> = { Accept: accept };
    if (contentType) headers["Content-Type"] = contentType;
    if (this.apiKey) headers["Authorization"] = `Bearer ${this.apiKey}`;
    // A stream body goes out as it is read (Node's fetch needs `duplex`).
    const init: RequestInit & { duplex?: "half" } = { method, headers, body };
    if (body instanceof ReadableStream) init.duplex = "half";
    const response = await fetch(this.url + path, init);
    if (!response.ok) {
      let code = "http_error";
      let message = response.statusText;
      try {
        const err = (await response.json()).error;
        code = err.code;
        message = err.message;
      } catch {
        // not our JSON error shape
      }
      const retry = response.headers.get("retry-after");
      throw new ZerobootError(response.status, code, message, retry ? Number(retry) : undefined);
    }
    return response;
  }

  async json<T>(method: string, path: string, payload?: unknown): Promise<T> {
    const body = payload === undefined ? undefined : JSON.stringify(payload);
    const response = await this.request(method, path, body, body ? "application/json" : undefined);
    const text = await response.text();
    return (text ? JSON.parse(text) : undefined) as T;
  }
}

function execBody(code: string, o: RunOptions = {}) {
  return {
    code,
    language: o.language ?? "python",
    timeout_seconds: o.timeoutSeconds ?? 30,
    stdin: o.stdin ?? "",
    ...(o.template ? { template: o.template } : {}),
    ...contextFields(o),
  };
}

function filePath(path: string) {
  return encodeURI(path.replace(/^\/+/, ""));
}

/** A zeroboot server. Every `run` forks a brand-new VM. */
export class Sandbox {
  private http: Http;

  constructor(options: { url?: string; apiKey?: string } = {}) {
    this.http = new Http((options.url ?? "http://127.0.0.1:8080").replace(/\/+$/, ""), options.apiKey);
  }

  run(code: string, options?: RunOptions): Promise<ExecResult> {
    return this.http.json("POST", "/v1/exec", execBody(code, options));
  }

  /** Runs each code in its own VM, in parallel; an entry that failed alone is its error. */
  async runBatch(codes: string[], options?: RunOptions): Promise<(ExecResult | ZerobootError)[]> {
    const body = { executions: codes.map((c) => execBody(c, options)) };
    const { results } = await this.http.json<{ results: any[] }>("POST", "/v1/exec/batch", body);
    return results.map((r) => (r.error ? new ZerobootError(0, r.error.code, r.error.message) : (r as ExecResult)));
  }

  /** Yields output events as the code writes, then the result event. */
  async *stream(code: string, options?: RunOptions): AsyncGenerator<StreamEvent> {
    const body = JSON.stringify({ ...execBody(code, options), stream: true });
    const response = await this.http.request("POST", "/v1/exec", body, "application/json", "text/event-stream");
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const piece of response.body as unknown as AsyncIterable<Uint8Array>) {
      buffer += decoder.decode(piece, { stream: true });
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data: string[] = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (data.length === 0) continue;
        const value = JSON.parse(data.join("\n"));
        if (name === "result") yield { kind: "result", result: value as ExecResult };
        else if (name === "error")
          yield { kind: "error", error: new ZerobootError(0, value.error.code, value.error.message) };
        else yield { kind: name as "stdout" | "stderr", text: value.data };
      }
    }
  }

  /** Starts a long-lived sandbox (see `Session`); `env` and `cwd` hold for every call in it, under each call's own. */
  async session(
    options: { language?: string; ttlSeconds?: number; template?: string } & ContextOptions = {},
  ): Promise<Session> {
    const info = await this.http.json<SandboxInfo>("POST", "/v1/sandboxes", {
      language: options.language ?? "python",
      ...(options.ttlSeconds !== undefined ? { ttl_seconds: options.ttlSeconds } : {}),
      ...(options.template ? { template: options.template } : {}),
      ...contextFields(options),
    });
    return new Session(this.http, info);
  }

  async sessions(): Promise<SandboxInfo[]> {
    return (await this.http.json<{ sandboxes: SandboxInfo[] }>("GET", "/v1/sandboxes")).sandboxes;
  }

  /**
   * The existing long-lived sandbox `id` (running or paused), made by this
   * client or another, perhaps before the server restarted.
   */
  async attach(id: string): Promise<Session> {
    return new Session(this.http, await this.http.json<SandboxInfo>("GET", `/v1/sandboxes/${encodeURIComponent(id)}`));
  }

  health(): Promise<unknown> {
    return this.http.json("GET", "/v1/health");
  }
}

/** A long-lived sandbox: variables, imports and files persist between `exec` calls. */
export class Session {
  readonly id: string;

  constructor(
    private http: Http,
    public info: SandboxInfo,
  ) {
    this.id = info.id;
  }

  /**
   * Saves the sandbox to the server's disk (what it changed since its
   * template) and frees its VM; the next call resumes it, also in a
   * restarted server.
   */
  async pause(): Promise<SandboxInfo> {
    this.info = await this.http.json<SandboxInfo>("POST", `/v1/sandboxes/${this.id}/pause`);
    return this.info;
  }

  exec(code: string, options: { timeoutSeconds?: number; stdin?: string } & ContextOptions = {}): Promise<ExecResult> {
    return this.http.json("POST", `/v1/sandboxes/${this.id}/exec`, {
      code,
      timeout_seconds: options.timeoutSeconds ?? 30,
      stdin: options.stdin ?? "",
      ...contextFields(options),
    });
  }

  /** New sessions that start from this one's current state. */
  async fork(count = 1): Promise<Session[]> {
    const forked = await this.http.json<{ sandboxes: SandboxInfo[] }>("POST", `/v1/sandboxes/${this.id}/fork`, {
      count,
    });
    return forked.sandboxes.map((info) => new Session(this.http, info));
  }

  /**
   * Writes a file (creating its directories), replacing any file there once
   * all of it is written. A ReadableStream is sent as it is read.
   */
  async writeFile(path: string, data: Uint8Array | string | ReadableStream<Uint8Array>): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    // fetch takes any ArrayBufferView; TypeScript's DOM types are narrower.
    const body = bytes as unknown as BodyInit;
    await this.http.request("PUT", `/v1/sandboxes/${this.id}/files/${filePath(path)}`, body, "application/octet-stream");
  }

  async readFile(path: string): Promise<Uint8Array> {
    const response = await this.http.request("GET", `/v1/sandboxes/${this.id}/files/${filePath(path)}`, undefined, undefined, "*/*");
    return new Uint8Array(await response.arrayBuffer());
  }

  /** A file's bytes as a stream, for files too large to hold. */
  async readFileStream(path: string): Promise<ReadableStream<Uint8Array>> {
    const response = await this.http.request("GET", `/v1/sandboxes/${this.id}/files/${filePath(path)}`, undefined, undefined, "*/*");
    if (!response.body) throw new ZerobootError(response.status, "no_body", "the server sent no body");
    return response.body;
  }

  stat(path: string): Promise<FileInfo> {
    return this.http.json("GET", `/v1/sandboxes/${this.id}/stat/${filePath(path)}`);
  }

  /** A directory's entries, sorted by name. */
  async listDir(path: string): Promise<FileInfo[]> {
    return (await this.http.json<{ entries: FileInfo[] }>("GET", `/v1/sandboxes/${this.id}/dirs/${filePath(path)}`)).entries;
  }

  /** Makes a directory and its parents; an existing one is fine. */
  async makeDir(path: string): Promise<void> {
    await this.http.request("PUT", `/v1/sandboxes/${this.id}/dirs/${filePath(path)}`);
  }

  /** Removes a file, or a directory and everything in it. */
  async remove(path: string): Promise<void> {
    await this.http.request("DELETE", `/v1/sandboxes/${this.id}/files/${filePath(path)}`);
  }

  /** Moves a file or directory, creating the target's parents. */
  async rename(from: string, to: string): Promise<void> {
    await this.http.json("POST", `/v1/sandboxes/${this.id}/rename`, { from, to });
  }

  async close(): Promise<void> {
    try {
      await this.http.request("DELETE", `/v1/sandboxes/${this.id}`);
    } catch (e) {
      if (!(e instanceof ZerobootError && e.status === 404)) throw e;
    }
  }
}
