//! Sending control requests: to the agent's socket (`call`), or through any function that
//! answers them (`Control`: the socket in the CLI and `replicate`, a closure in tests), and
//! reading the answer as its type (`ask`).

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::proto::Request;

/// Whatever carries a request to the agent and brings back its answer (`"ok": true`
/// checked: a refusal is an error).
pub type Control<'a> = &'a (dyn Fn(&Request) -> Result<Value> + Sync);

/// Sends one request to the agent's control socket and returns its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `ctk-agent serve` running? see --control)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    let n = std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .context("reading the agent's answer")?;
    answer_of(&answer[..n], socket)
}

/// An answer line read from the agent at `socket` (empty: it closed the connection), its
/// refusal an error.
pub fn answer_of(answer: &str, socket: &Path) -> Result<Value> {
    if answer.is_empty() {
        bail!(
            "the agent at {} closed the connection without answering: it crashed or was killed \
             (see its log); what was asked may or may not have happened",
            socket.display()
        );
    }
    let answer: Value = serde_json::from_str(answer).context("the agent's answer is not JSON")?;
    if answer["ok"] != true {
        bail!(
            "{}",
            answer["error"]
                .as_str()
                .unwrap_or("the agent refused the request")
        );
    }
    Ok(answer)
}

/// Sends `request` through `control` and reads the answer as a `T`.
pub fn ask<T: DeserializeOwned>(control: Control, request: &Request) -> Result<T> {
    let answer = control(request)?;
    serde_json::from_value(answer).context("the agent's answer is not what this version expects")
}
