//! `ctk-receiver`: the offsite half of ctk (accepts deltas over QUIC, merges them into a
//! synthetic full with restore points). Not built yet: see ARCHITECTURE.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("ctk-receiver {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "ctk-receiver {}: no commands yet. The receiver (QUIC, synthetic full, restore points) is \
         not implemented in this version; deltas can be exported with `ctk-agent demo` and checked \
         with `ctk-agent verify-delta`.",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(1)
}
