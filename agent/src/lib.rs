//! ctk-agent as a library: the binary (`main.rs`) is a thin CLI over these modules, and the
//! fuzz targets reach the parsers of untrusted bytes (`nbd`, `config`) through it.

pub mod config;
pub mod continuous;
pub mod control;
pub mod demo;
pub mod disk;
pub mod freeze;
pub mod front;
pub mod limits;
pub mod mounts;
pub mod nbd;
pub mod nbd_client;
pub mod owner;
pub mod pipeline;
pub mod quickstart;
pub mod readahead;
pub mod replicate;
pub mod server;
