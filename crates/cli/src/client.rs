//! `zeroboot exec` and `zeroboot sandbox ...`: a client of a running
//! `zeroboot serve`. Output streams as the guest writes it; on a terminal,
//! stderr is coloured and slow calls show a spinner.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use console::style;
use serde_json::{json, Value};

use crate::context_args::ContextArgs;

#[derive(clap::Args)]
pub struct Server {
    /// The zeroboot server.
    #[arg(long, env = "ZEROBOOT_URL", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, env = "ZEROBOOT_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    server: Server,
    /// Run in this long-lived sandbox instead of a new one.
    #[arg(long)]
    sandbox: Option<String>,
    #[command(flatten)]
    pick: Pick,
    /// Seconds the code may run.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    #[command(flatten)]
    context: ContextArgs,
    /// Code to run.
    #[arg(short = 'c', conflicts_with = "file")]
    code: Option<String>,
    /// File with code to run, or - for standard input.
    file: Option<std::path::PathBuf>,
}

/// Which template a new sandbox is forked from.
#[derive(clap::Args)]
pub struct Pick {
    /// Language of the code: python, node (javascript) or bash.
    #[arg(long, default_value = "python")]
    language: String,
    /// A template by name, instead of the one serving --language.
    #[arg(long)]
    template: Option<String>,
}

impl Pick {
    /// Adds `language` and `template` to a request body.
    fn apply(&self, mut body: Value) -> Value {
        body["language"] = json!(self.language);
        if let Some(t) = &self.template {
            body["template"] = json!(t);
        }
        body
    }
}

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Start a long-lived sandbox; prints its id.
    Create {
        #[command(flatten)]
        server: Server,
        #[command(flatten)]
        pick: Pick,
        /// Idle seconds before it is removed.
        #[arg(long)]
        ttl: Option<f64>,
        /// The environment and working directory of every call in it.
        #[command(flatten)]
        context: ContextArgs,
    },
    /// List your sandboxes.
    Ls {
        #[command(flatten)]
        server: Server,
    },
    /// Make COUNT sandboxes that start from ID's current state; prints their ids.
    Fork {
        #[command(flatten)]
        server: Server,
        id: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Remove a sandbox.
    Rm {
        #[command(flatten)]
        server: Server,
        id: String,
    },
}

impl ExecArgs {
    pub fn code(&self) -> &Option<String> {
        &self.code
    }

    pub fn file(&self) -> &Option<std::path::PathBuf> {
        &self.file
    }
}

pub(crate) struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub(crate) fn new(server: &Server) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3600)))
            .build()
            .into();
        Self {
            base: server.server.trim_end_matches('/').to_string(),
            key: server.api_key.clone(),
            agent,
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        accept: &str,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{path}", self.base);
        let auth = self.key.as_ref().map(|k| format!("Bearer {k}"));
        let result = match (method, body) {
            ("GET", _) | ("DELETE", _) => {
                let mut req = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                req = req.header("Accept", accept);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
            (_, body) => {
                let mut req = self.agent.post(&url).header("Accept", accept);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send_json(body.unwrap_or(Value::Null))
            }
        };
        self.check(result)
    }

    /// The response, or the server's error as one.
    fn check(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut response = result.map_err(|e| anyhow!("{}: {e}", self.base))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    Some(format!(
                        "{} ({})",
                        v["error"]["message"].as_str()?,
                        v["error"]["code"].as_str()?
                    ))
                })
                .unwrap_or(text);
            bail!("server answered {status}: {message}");
        }
        Ok(response)
    }

    /// PUTs `len` bytes read from `body` (or what it has, without `len`), streamed.
    pub(crate) fn put(&self, path: &str, body: &mut dyn std::io::Read, len: Option<u64>) -> Result<()> {
        let mut req = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Content-Type", "application/octet-stream");
        if let Some(len) = len {
            req = req.header("Content-Length", len.to_string());
        }
        if let Some(k) = &self.key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        self.check(req.send(ureq::SendBody::from_reader(body)))?;
        Ok(())
    }

    /// GETs `path`; the body streams from the response.
    pub(crate) fn get(&self, path: &str) -> Result<ureq::http::Response<ureq::Body>> {
        self.send("GET", path, None, "*/*")
    }

    pub(crate) fn json(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let mut response = self.send(method, path, body, "application/json")?;
        let text = response.body_mut().read_to_string()?;
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }
}

fn spinner(message: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// A stream's bytes as the code wrote them: the `exact` base64 field where
/// the server sent one (output that is not UTF-8), else the `text` field.
fn stream_bytes(value: &Value, text: &str, exact: &str) -> Vec<u8> {
    use base64::Engine;
    let decoded = value[exact]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    decoded.unwrap_or_else(|| value[text].as_str().unwrap_or("").as_bytes().to_vec())
}

fn print_stdout(bytes: &[u8]) {
    let mut out = std::io::stdout();
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// stderr in red on a terminal, else the bytes as they are.
fn print_stderr(bytes: &[u8]) {
    if std::io::stderr().is_terminal() {
        eprint!("{}", style(String::from_utf8_lossy(bytes)).red());
    } else {
        let _ = std::io::stderr().write_all(bytes);
    }
}

/// Prints a result's output and returns the exit code to leave with.
fn finish(result: &Value, streamed: bool) -> ExitCode {
    let stderr = stream_bytes(result, "stderr", "stderr_base64");
    if !streamed {
        print_stdout(&stream_bytes(result, "stdout", "stdout_base64"));
        print_stderr(&stderr);
    }
    if result["timed_out"].as_bool() == Some(true) {
        if streamed {
            print_stderr(&stderr);
        }
        return ExitCode::from(124);
    }
    ExitCode::from((result["exit_code"].as_i64().unwrap_or(1) & 0xff) as u8)
}

pub fn exec(args: &ExecArgs, code: String) -> Result<ExitCode> {
    let client = Client::new(&args.server);
    if let Some(id) = &args.sandbox {
        let bar = spinner("running");
        let result = client.json(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(
                args.context
                    .apply(json!({"code": code, "timeout_seconds": args.timeout}))?,
            ),
        );
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        return Ok(finish(&result?, false));
    }
    let mut response = client.send(
        "POST",
        "/v1/exec",
        Some(
            args.context.apply(
                args.pick
                    .apply(json!({"code": code, "timeout_seconds": args.timeout, "stream": true})),
            )?,
        ),
        "text/event-stream",
    )?;
    let reader = BufReader::new(response.body_mut().as_reader());
    let mut event = String::new();
    for line in reader.lines() {
        let line = line?;
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data:") {
            let value: Value = serde_json::from_str(data.trim_start())?;
            match event.as_str() {
                "stdout" => print_stdout(&stream_bytes(&value, "data", "data_base64")),
                "stderr" => print_stderr(&stream_bytes(&value, "data", "data_base64")),
                "result" => return Ok(finish(&value, true)),
                "error" => bail!(
                    "{} ({})",
                    value["error"]["message"].as_str().unwrap_or("error"),
                    value["error"]["code"].as_str().unwrap_or("")
                ),
                _ => {}
            }
        }
    }
    bail!("the server closed the stream before the result")
}

pub fn sandbox(cmd: &SandboxCommand) -> Result<()> {
    match cmd {
        SandboxCommand::Create {
            server,
            pick,
            ttl,
            context,
        } => {
            let body = context.apply(pick.apply(match ttl {
                Some(t) => json!({"ttl_seconds": t}),
                None => json!({}),
            }))?;
            let bar = spinner("forking a sandbox");
            let info = Client::new(server).json("POST", "/v1/sandboxes", Some(body));
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            println!("{}", info?["id"].as_str().unwrap_or(""));
        }
        SandboxCommand::Ls { server } => {
            let list = Client::new(server).json("GET", "/v1/sandboxes", None)?;
            println!("{:<30} {:<10} {:>8} {:>8} PARENT", "ID", "TEMPLATE", "IDLE", "TTL");
            for s in list["sandboxes"].as_array().into_iter().flatten() {
                println!(
                    "{:<30} {:<10} {:>7.0}s {:>7.0}s {}",
                    s["id"].as_str().unwrap_or(""),
                    s["template"].as_str().unwrap_or(""),
                    s["idle_seconds"].as_f64().unwrap_or(0.0),
                    s["ttl_seconds"].as_f64().unwrap_or(0.0),
                    s["parent"].as_str().unwrap_or("-"),
                );
            }
        }
        SandboxCommand::Fork { server, id, count } => {
            let forked = Client::new(server).json(
                "POST",
                &format!("/v1/sandboxes/{id}/fork"),
                Some(json!({"count": count})),
            )?;
            for s in forked["sandboxes"].as_array().into_iter().flatten() {
                println!("{}", s["id"].as_str().unwrap_or(""));
            }
        }
        SandboxCommand::Rm { server, id } => {
            Client::new(server).json("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
        }
    }
    Ok(())
}
