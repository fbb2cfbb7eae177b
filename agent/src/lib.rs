//! ctk-agent as a library: the binary (`main.rs`) is a thin CLI over these modules, and the
//! fuzz targets reach the parsers of untrusted bytes (`nbd`, `config`) through it; `ctk-demo`
//! runs it in-process.

pub mod config;
pub mod continuous;
pub mod control;
pub mod disk;
pub mod failback;
pub mod freeze;
pub mod front;
pub mod group;
pub mod limits;
pub mod mounts;
/// The NBD codec (its own crate: the receiver serves NBD too).
pub use ctk_nbd as nbd;
pub mod nbd_client;
pub mod owner;
pub mod pipeline;
pub mod readahead;
pub mod replicate;
pub mod server;
