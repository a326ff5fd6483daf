//! ferry: encrypted peer-to-peer folder sync.
//!
//! The library holds everything testable; the `ferry` binary is a thin shell over
//! [`cli`]. Modules are named after the part of the domain they own.

pub mod chunking;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod folder;
pub mod history;
pub mod home;
pub mod index;
pub mod pairing;
pub mod peers;
pub mod progress;
pub mod protocol;
pub mod relpath;
pub mod scan;
pub mod sync;
pub mod transport;
pub mod vault;
pub mod version_vector;
