//! Earlier versions of files, each device's own backups: the chunk store that
//! holds their bytes, and the retention policy that decides how long they stay.

pub mod retention;
pub mod store;
