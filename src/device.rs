//! Device identity: the public key that names a device, and the short form used
//! inside version vectors.

use std::fmt;
use std::str::FromStr;

use iroh_base::PublicKey;

/// A device, named by its iroh public key (printed as 64 hex characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(PublicKey);

impl DeviceId {
    /// Wraps an iroh public key.
    pub fn new(key: PublicKey) -> Self {
        Self(key)
    }

    /// The iroh public key.
    pub fn public_key(&self) -> PublicKey {
        self.0
    }

    /// The first eight bytes of the key, the device's name in version vectors.
    pub fn short(&self) -> ShortId {
        let b = self.0.as_bytes();
        ShortId(u64::from_be_bytes(b[..8].try_into().expect("8 bytes")))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0.fmt_short())
    }
}

impl FromStr for DeviceId {
    type Err = iroh_base::KeyParsingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(PublicKey::from_str(s.trim())?))
    }
}

/// A device's 64-bit short id: the key in a [`crate::version_vector::VersionVector`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ShortId(pub u64);

impl fmt::Display for ShortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
