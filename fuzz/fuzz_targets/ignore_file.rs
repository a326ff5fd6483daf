//! Any `.ferryignore` text builds a matcher or reports a line, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(m) = ferry::scan::ignore_matcher(std::path::Path::new("/folder"), &text) {
        let _ = m.matched("a/b.txt", false);
    }
});
