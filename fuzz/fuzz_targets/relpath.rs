//! A path that validates can never leave its folder or reach the marker.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(p) = ferry::relpath::RelPath::new(s)
    {
        let root = Path::new("/folder");
        let full = p.to_fs(root);
        assert!(full.starts_with(root));
        assert!(!full.starts_with(root.join(".ferry")));
        assert!(full.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
    }
});
