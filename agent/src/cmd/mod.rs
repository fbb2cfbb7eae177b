//! The subcommands of `ctk-agent` other than the daemon's hidden helpers: `serve` (the
//! daemon), the commands that talk to a running agent over its control socket (`cut`,
//! `changed`, `export`, `resize`, `cursor`, `status`), `replicate`, and the offline ones
//! (`init`, `verify-delta`). What they share (the `--control`/`--disk`/`--json` target,
//! value parsers, printing an answer) is here.

use std::path::PathBuf;

use anyhow::{Context, Result};

use ctk::Consistency;
use ctk_agent::continuous;
use ctk_agent::control::{Request, proto};

pub mod control;
pub mod failback;
pub mod offline;
pub mod replicate;
pub mod serve;

pub(crate) const DEFAULT_CONTROL: &str = "/run/ctk-agent/control.sock";

/// Which running agent and disk a client command talks to.
#[derive(clap::Args)]
pub(crate) struct Target {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// The disk (may be left out when the agent protects one disk).
    #[arg(long)]
    pub disk: Option<String>,
    /// Print the agent's JSON answer.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_disk(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or("use NAME=PATH, e.g. vm1=/images/vm1.img")?;
    if !ctk_agent::group::valid_name(name) {
        return Err(format!(
            "disk name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with . or -"
        ));
    }
    if path.is_empty() {
        return Err("the disk path is empty".into());
    }
    Ok((name.to_owned(), PathBuf::from(path)))
}

/// Sends one request to the agent's control socket (naming `--disk` unless the request
/// does) and returns its answer.
pub(crate) fn control(target: &Target, request: &Request) -> Result<serde_json::Value> {
    let request = request.clone().for_disk(target.disk.as_deref());
    ctk_agent::control::call(&target.control, &request)
}

/// Prints an answer: its JSON with --json, else `human` of it read as its type.
pub(crate) fn show<T: serde::de::DeserializeOwned>(
    target: &Target,
    answer: serde_json::Value,
    human: impl Fn(&T) -> String,
) -> Result<()> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let typed: T = serde_json::from_value(answer)
            .context("the agent's answer is not what this version expects")?;
        println!("{}", human(&typed));
    }
    Ok(())
}

pub(crate) fn parse_consistency(text: &str) -> Result<Consistency, String> {
    text.parse()
}

pub(crate) fn parse_cursor_op(text: &str) -> Result<proto::CursorOp, String> {
    text.parse()
}

pub(crate) fn parse_since(text: &str) -> Result<ctk::Since, String> {
    match text {
        "all" => Ok(ctk::Since::All),
        t => t
            .parse()
            .map(ctk::Since::Id)
            .map_err(|e| format!("{e}; or \"all\"")),
    }
}

pub(crate) fn parse_at(text: &str) -> Result<u32, String> {
    continuous::parse_time_of_day(text).map_err(|e| e.to_string())
}

pub(crate) fn parse_rate(text: &str) -> Result<u64, String> {
    continuous::parse_rate(text).map_err(|e| e.to_string())
}

pub(crate) fn print_answer(
    target: &Target,
    answer: &serde_json::Value,
    human: impl Fn(&serde_json::Value) -> String,
) -> Result<()> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        println!("{}", human(answer));
    }
    Ok(())
}

/// A digest-compare unit from the command line (`flag` names it in the error): a multiple of
/// 4K from 4K to 16M.
pub(crate) fn digest_unit(bytes: u64, flag: &str) -> Result<u32> {
    u32::try_from(bytes)
        .ok()
        .filter(|u| ctk::digest::unit_count(0, *u).is_ok())
        .with_context(|| format!("{flag}: use a multiple of 4K from 4K to 16M"))
}
