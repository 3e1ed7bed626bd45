//! `zeroboot files`: the files API of a long-lived sandbox from the shell.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::client::{Client, Server};

#[derive(clap::Subcommand)]
pub enum FilesCommand {
    /// Upload LOCAL (- for standard input) to REMOTE in sandbox ID, streamed.
    Put {
        #[command(flatten)]
        server: Server,
        id: String,
        local: PathBuf,
        remote: String,
    },
    /// Download REMOTE from sandbox ID into LOCAL (standard output without it), streamed.
    Get {
        #[command(flatten)]
        server: Server,
        id: String,
        remote: String,
        local: Option<PathBuf>,
    },
    /// List a directory.
    Ls {
        #[command(flatten)]
        server: Server,
        id: String,
        #[arg(default_value = "/home/user")]
        path: String,
    },
    /// A file's or directory's metadata, as JSON.
    Stat {
        #[command(flatten)]
        server: Server,
        id: String,
        path: String,
    },
    /// Make a directory and its parents.
    Mkdir {
        #[command(flatten)]
        server: Server,
        id: String,
        path: String,
    },
    /// Remove a file, or a directory and everything in it.
    Rm {
        #[command(flatten)]
        server: Server,
        id: String,
        path: String,
    },
    /// Move a file or directory.
    Mv {
        #[command(flatten)]
        server: Server,
        id: String,
        from: String,
        to: String,
    },
}

/// The URL path of `path` in sandbox `id` under `kind` (files, dirs, stat).
fn url(id: &str, kind: &str, path: &str) -> String {
    let encoded: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|part| {
            part.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect()
        })
        .collect();
    format!("/v1/sandboxes/{id}/{kind}/{}", encoded.join("/"))
}

pub fn run(cmd: &FilesCommand) -> Result<()> {
    match cmd {
        FilesCommand::Put {
            server,
            id,
            local,
            remote,
        } => {
            let client = Client::new(server);
            let path = url(id, "files", remote);
            if local.as_os_str() == "-" {
                client.put(&path, &mut std::io::stdin().lock(), None)
            } else {
                let mut file = std::fs::File::open(local).with_context(|| format!("opening {}", local.display()))?;
                let len = file.metadata()?.len();
                client.put(&path, &mut file, Some(len))
            }
        }
        FilesCommand::Get {
            server,
            id,
            remote,
            local,
        } => {
            let mut response = Client::new(server).get(&url(id, "files", remote))?;
            let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
            match local {
                Some(local) => {
                    let mut file =
                        std::fs::File::create(local).with_context(|| format!("creating {}", local.display()))?;
                    std::io::copy(&mut body, &mut file)?;
                }
                None => {
                    std::io::copy(&mut body, &mut std::io::stdout().lock())?;
                }
            }
            Ok(())
        }
        FilesCommand::Ls { server, id, path } => {
            let listing = Client::new(server).json("GET", &url(id, "dirs", path), None)?;
            let mut out = std::io::stdout().lock();
            for e in listing["entries"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{:<8} {:>12} {:>5o}  {}",
                    e["type"].as_str().unwrap_or(""),
                    e["size"].as_u64().unwrap_or(0),
                    e["mode"].as_u64().unwrap_or(0),
                    e["name"].as_str().unwrap_or("")
                )?;
            }
            Ok(())
        }
        FilesCommand::Stat { server, id, path } => {
            let info: Value = Client::new(server).json("GET", &url(id, "stat", path), None)?;
            println!("{info}");
            Ok(())
        }
        FilesCommand::Mkdir { server, id, path } => {
            Client::new(server).put(&url(id, "dirs", path), &mut std::io::empty(), Some(0))
        }
        FilesCommand::Rm { server, id, path } => {
            Client::new(server).json("DELETE", &url(id, "files", path), None)?;
            Ok(())
        }
        FilesCommand::Mv { server, id, from, to } => {
            Client::new(server).json(
                "POST",
                &format!("/v1/sandboxes/{id}/rename"),
                Some(json!({"from": from, "to": to})),
            )?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_encoded_per_component() {
        assert_eq!(
            url("s", "files", "/home/user/it's a #file"),
            "/v1/sandboxes/s/files/home/user/it%27s%20a%20%23file"
        );
        assert_eq!(url("s", "dirs", "home/user"), "/v1/sandboxes/s/dirs/home/user");
    }
}
