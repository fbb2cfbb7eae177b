//! The receiver's library: the per-disk store (`store`), the QUIC server (`server`) and the NBD
//! exports of restore points (`export`). The
//! `ctk-receiver` binary is a thin CLI over it; `ctk-demo` runs it in-process.

pub mod export;
pub mod failback;
pub mod retention;
pub mod server;
pub mod store;
