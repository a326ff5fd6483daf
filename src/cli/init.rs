//! `ferry init`: create the device home.

use std::path::Path;

use crate::home::{Home, InitOutcome};

pub(super) fn run(root: &Path, name: Option<&str>) -> anyhow::Result<i32> {
    let (home, created) = match Home::init(root, name)? {
        InitOutcome::Created(h) => (h, true),
        InitOutcome::AlreadyInitialised(h) => (h, false),
    };
    if created {
        println!("Initialised a ferry home at {}", root.display());
    } else {
        println!(
            "A ferry home already exists at {}; nothing was changed.",
            root.display()
        );
    }
    println!("Device id:   {}", home.device_id());
    println!("Device name: {}", home.config().device.name);
    println!("Config:      {}", home.config_path().display());
    Ok(super::EXIT_OK)
}
