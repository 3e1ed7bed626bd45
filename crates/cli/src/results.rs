//! `zeroboot run --results DIR`: the rich results of a run (the value of the
//! last expression, what the code displayed, the figures it left open),
//! one line each on stdout, their images and HTML written into DIR.

use std::path::Path;

use anyhow::{Context as _, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::Value;

/// Where each MIME type is written, and the extension it gets.
const FILES: &[(&str, &str, bool)] = &[
    ("image/png", "png", true),
    ("image/jpeg", "jpg", true),
    ("image/svg+xml", "svg", false),
    ("text/html", "html", false),
];

/// Writes the results in `lines` (what the guest sent: one JSON object a
/// line) into `dir` and prints one line for each.
pub fn write(dir: &Path, lines: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let results = lines
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok());
    for (i, result) in results.enumerate() {
        let n = i + 1;
        let kind = result["type"].as_str().unwrap_or("result");
        let Some(data) = result["data"].as_object() else {
            continue;
        };
        let mut written = Vec::new();
        for &(mime, extension, binary) in FILES {
            let Some(text) = data.get(mime).and_then(Value::as_str) else {
                continue;
            };
            let bytes = if binary {
                BASE64
                    .decode(text)
                    .with_context(|| format!("result {n}: {mime} is not base64"))?
            } else {
                text.as_bytes().to_vec()
            };
            let path = dir.join(format!("result-{n}.{extension}"));
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            written.push(path.display().to_string());
        }
        let plain = data.get("text/plain").and_then(Value::as_str).unwrap_or("");
        let plain: String = plain.chars().take(80).collect::<String>().replace('\n', " ");
        let mimes: Vec<&str> = data.keys().map(String::as_str).collect();
        let files = if written.is_empty() {
            String::new()
        } else {
            format!(" -> {}", written.join(", "))
        };
        println!("result {n} {kind} [{}]: {plain}{files}", mimes.join(", "));
    }
    Ok(())
}
