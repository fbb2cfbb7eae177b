//! The receiver's library: the per-disk store (`store`) and the QUIC server (`server`). The
//! `ctk-receiver` binary is a thin CLI over it; `ctk-demo` runs it in-process.

pub mod retention;
pub mod server;
pub mod store;
