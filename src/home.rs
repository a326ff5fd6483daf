//! The device home: the directory holding this device's secret key, config and
//! index. Several homes can live side by side on one machine (one per device).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use iroh_base::SecretKey;

use crate::config::{Config, ConfigError};
use crate::device::DeviceId;
use crate::index::{Index, IndexError};

/// The device key's file name in the home.
pub const KEY_FILE: &str = "device.key";
/// The config file's name in the home.
pub const CONFIG_FILE: &str = "config.toml";
/// The index database's file name in the home.
pub const DB_FILE: &str = "index.db";

/// Why a home could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// No home at that path.
    #[error("no ferry home at {0} (run `ferry init` first, or pass --home)")]
    NotInitialised(PathBuf),
    /// No `--home`, no `FERRY_HOME`, and no platform data directory.
    #[error("cannot tell where the ferry home is: set FERRY_HOME or pass --home")]
    NoDefault,
    /// The key file is not 64 hex characters.
    #[error("{0} is not a ferry device key (expected 64 hex characters)")]
    BadKey(PathBuf),
    /// The key file can be read by others.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The config does not parse or validate.
    #[error("{path}: {source}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        source: ConfigError,
    },
    /// The index could not be opened.
    #[error("{path}: {source}")]
    Index {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        source: IndexError,
    },
    /// A filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the home is: `--home`/`FERRY_HOME` if given, else the platform data
/// directory (`$XDG_DATA_HOME/ferry` on Linux).
pub fn resolve(explicit: Option<PathBuf>) -> Result<PathBuf, HomeError> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    directories::ProjectDirs::from("", "", "ferry")
        .map(|d| d.data_dir().to_owned())
        .ok_or(HomeError::NoDefault)
}

/// What `ferry init` did.
#[derive(Debug)]
pub enum InitOutcome {
    /// A new home was created.
    Created(Home),
    /// A home was already there; nothing was changed.
    AlreadyInitialised(Home),
}

/// An opened device home. Clones share the config, so the running agent's
/// parts all see a reloaded config ([`Home::set_config`]).
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
    secret: SecretKey,
    config: Arc<RwLock<Arc<Config>>>,
}

impl Home {
    /// Creates a home at `root` with a fresh key, a commented config and an empty
    /// index. An existing home is left exactly as it is.
    pub fn init(root: &Path, name: Option<&str>) -> Result<InitOutcome, HomeError> {
        if root.join(KEY_FILE).exists() {
            return Ok(InitOutcome::AlreadyInitialised(Home::open(root)?));
        }
        fs::create_dir_all(root).map_err(io_err(root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err(root))?;

        let mut config = Config::default();
        if let Some(n) = name {
            config.device.name = n.to_owned();
        }
        let config_text = config.to_commented_toml();
        // Validate before writing anything that would make the home look initialised.
        Config::from_toml_str(&config_text).map_err(|source| HomeError::Config {
            path: root.join(CONFIG_FILE),
            source,
        })?;
        let config_path = root.join(CONFIG_FILE);
        if !config_path.exists() {
            write_atomic(&config_path, config_text.as_bytes(), 0o600)?;
        }

        let secret = SecretKey::generate();
        let hex = blake3::Hash::from_bytes(secret.to_bytes()).to_hex();
        // The key goes last: its presence is what marks a complete home.
        write_atomic(&root.join(KEY_FILE), format!("{hex}\n").as_bytes(), 0o600)?;

        let home = Home::open(root)?;
        Ok(InitOutcome::Created(home))
    }

    /// Opens an existing home, reading its key and config and making sure the
    /// index opens and knows this device.
    pub fn open(root: &Path) -> Result<Home, HomeError> {
        let key_path = root.join(KEY_FILE);
        let meta = match fs::metadata(&key_path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HomeError::NotInitialised(root.to_owned()));
            }
            Err(e) => return Err(io_err(&key_path)(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(HomeError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let text = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let bytes =
            blake3::Hash::from_hex(text.trim()).map_err(|_| HomeError::BadKey(key_path.clone()))?;
        let secret = SecretKey::from_bytes(bytes.as_bytes());

        let config = read_config(&root.join(CONFIG_FILE))?;
        let home = Home {
            root: root.to_owned(),
            secret,
            config: Arc::new(RwLock::new(Arc::new(config))),
        };
        // Keep the index's record of this device in step with the key and config;
        // read first so that read-only commands do not need the write lock.
        let index = home.index()?;
        let index_err = |source| HomeError::Index {
            path: index.path().to_owned(),
            source,
        };
        let local = index
            .devices()
            .map_err(index_err)?
            .into_iter()
            .find(|d| d.is_local);
        let name = home.config().device.name.clone();
        if local.is_none_or(|d| d.id != home.device_id() || d.name != name) {
            index
                .set_local_device(home.device_id(), &name)
                .map_err(index_err)?;
        }
        Ok(home)
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The device's secret key.
    pub fn secret_key(&self) -> &SecretKey {
        &self.secret
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::new(self.secret.public())
    }

    /// The config in use: as read when the home was opened, or as last set
    /// with [`Home::set_config`].
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the config in use, for this handle and all its clones.
    pub fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// Reads and validates the config file as it is now on disk.
    pub fn read_config(&self) -> Result<Config, HomeError> {
        read_config(&self.config_path())
    }

    /// The config file's path.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// Opens the index database, told which folders keep local versions.
    pub fn index(&self) -> Result<Index, HomeError> {
        let path = self.root.join(DB_FILE);
        let config = self.config();
        let mut index = Index::open(
            &path,
            Duration::from_millis(config.database.busy_timeout_ms),
        )
        .map_err(|source| HomeError::Index { path, source })?;
        keep_index_private(&self.root);
        index.set_local_history(config.local_history());
        Ok(index)
    }
}

/// Reads a config file; a missing file is the default config.
fn read_config(path: &Path) -> Result<Config, HomeError> {
    match fs::read_to_string(path) {
        Ok(t) => Config::from_toml_str(&t).map_err(|source| HomeError::Config {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Makes the index and its WAL files readable by the user alone: they hold the
/// folders' vault secrets. SQLite creates the WAL files with the database's
/// mode, so after the first open this finds nothing to change.
fn keep_index_private(root: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let path = root.join(format!("{DB_FILE}{suffix}"));
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0
            && let Err(e) = fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        {
            tracing::warn!("cannot make {} private (mode 600): {e}", path.display());
        }
    }
}

/// Writes `bytes` to a temp file beside `path` with `mode`, fsyncs it, and
/// renames it into place (then fsyncs the directory), so `path` is either
/// its old or its new content, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HomeError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_private_key_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("home");
        let InitOutcome::Created(a) = Home::init(&root, Some("alpha")).unwrap() else {
            panic!("expected a new home");
        };
        let mode = fs::metadata(root.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let key_before = fs::read(root.join(KEY_FILE)).unwrap();
        let InitOutcome::AlreadyInitialised(b) = Home::init(&root, Some("beta")).unwrap() else {
            panic!("expected the existing home");
        };
        assert_eq!(a.device_id(), b.device_id());
        assert_eq!(b.config().device.name, "alpha");
        assert_eq!(fs::read(root.join(KEY_FILE)).unwrap(), key_before);
    }

    #[test]
    fn the_index_and_its_wal_are_private_even_if_loosened() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("home");
        let InitOutcome::Created(home) = Home::init(&root, None).unwrap() else {
            panic!("expected a new home");
        };
        let db = root.join(DB_FILE);
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
        let index = home.index().unwrap();
        index.set_local_device(home.device_id(), "renamed").unwrap();
        for file in [DB_FILE, "index.db-wal", "index.db-shm"] {
            let mode = fs::metadata(root.join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn a_missing_home_is_reported_as_not_initialised() {
        let dir = tempfile::tempdir().unwrap();
        let err = Home::open(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, HomeError::NotInitialised(_)), "{err}");
    }
}
