//! `--env NAME=VALUE`, `--cwd DIR` and `--user`: where code runs, what
//! environment it sees and who it runs as, for `zeroboot run`, `zeroboot exec` and `zeroboot sandbox create`.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use zeroboot_protocol::Context;

#[derive(clap::Args, Default)]
pub struct ContextArgs {
    /// An environment variable for the code (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory of the code.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// Who the code runs as: `user` (uid 1000, the default) or `root`.
    #[arg(long, value_name = "user|root")]
    user: Option<String>,
}

impl ContextArgs {
    /// The context the arguments name, checked as the guest needs it.
    pub fn context(&self) -> Result<Context> {
        let mut context = Context {
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            ..Context::default()
        };
        for pair in &self.env {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--env {pair:?}: expected NAME=VALUE"))?;
            context.env.insert(name.to_string(), value.to_string());
        }
        context.validate()?;
        Ok(context)
    }

    /// Adds `env` and `cwd` to a request body of the HTTP API.
    pub fn apply(&self, mut body: Value) -> Result<Value> {
        let context = self.context()?;
        if !context.env.is_empty() {
            body["env"] = json!(context.env);
        }
        if let Some(cwd) = context.cwd {
            body["cwd"] = json!(cwd);
        }
        if let Some(user) = context.user {
            body["user"] = json!(user);
        }
        Ok(body)
    }
}
