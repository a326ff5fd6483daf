//! Pairing devices: invite codes, the pairing handshake, and the device list.

pub mod code;
pub mod handshake;
