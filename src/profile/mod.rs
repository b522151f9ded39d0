//! Named sandbox profiles: where they come from, how they are found, and how they are checked.
//!
//! `schema.rs` is the TOML a user writes; `validate.rs` turns it into a [`Profile`] the sandbox
//! planner can trust. This file owns lookup. A name resolves, first match wins, in:
//!
//! 1. `[slm.sandbox_profiles.NAME]` in corral.toml,
//! 2. `NAME.toml` in the profiles directory (`--profiles-dir`, `CORRAL_PROFILES_DIR`, or
//!    `profiles/` beside the config file),
//! 3. the built-ins (`secure`, `standard`, `gpu`), compiled from this repository's `profiles/`.
//!
//! A name defined both inline and in the directory is an error (which one would a reader expect?).
//! A profile is merged onto its base before validation: the profile named by `extends`, or the
//! built-in `secure`, so a file lists only what differs and every field left out is the strict one.

pub mod schema;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use schema::RawProfile;
pub use validate::Profile;

/// The built-in profiles, as shipped in `profiles/`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("secure", include_str!("../../profiles/secure.toml")),
    ("standard", include_str!("../../profiles/standard.toml")),
    ("gpu", include_str!("../../profiles/gpu.toml")),
];

/// The profile every other profile starts from unless it says `extends`.
pub const BASE_PROFILE: &str = "secure";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error(
        "no sandbox profile named '{name}' (known: {known}); pass a name or a path to a .toml file"
    )]
    NotFound { name: String, known: String },
    #[error("sandbox profile '{name}' is defined twice: in {first} and in {second}; remove one")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: extends: profile '{name}' extends itself through {chain}")]
    ExtendsCycle {
        origin: String,
        name: String,
        chain: String,
    },
}

pub type Result<T, E = ProfileError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
enum Origin {
    Builtin(&'static str),
    File(PathBuf),
    Inline { config: PathBuf },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(name) => write!(f, "built-in profiles/{name}.toml"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Inline { config } => write!(f, "{}", config.display()),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    origin: Origin,
    /// Key prefix inside the origin file (`slm.sandbox_profiles.NAME.` for inline profiles).
    key_prefix: String,
    /// The profile's table; a built-in's is parsed from its text when first needed.
    table: OnceLock<toml::Table>,
    /// The compiled profile, once `resolve` has compiled it (the configuration checks every
    /// profile at load, then each launch resolves its own: compiled once, cloned after).
    compiled: OnceLock<Profile>,
}

impl Entry {
    fn table(&self) -> &toml::Table {
        self.table.get_or_init(|| match self.origin {
            // The built-ins are part of the binary and checked by the test suite.
            Origin::Builtin(name) => BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, text)| toml::from_str(text).ok())
                .unwrap_or_default(),
            // Files and inline profiles are read when the registry is loaded.
            Origin::File(_) | Origin::Inline { .. } => toml::Table::new(),
        })
    }
}

/// All profiles known to one configuration, by name.
#[derive(Debug, Clone)]
pub struct ProfileRegistry {
    entries: BTreeMap<String, Entry>,
    builtins: BTreeMap<String, Entry>,
}

impl ProfileRegistry {
    /// The built-in profiles only.
    pub fn builtin() -> Self {
        let mut builtins = BTreeMap::new();
        for (name, _) in BUILTIN {
            builtins.insert(
                (*name).to_string(),
                Entry {
                    origin: Origin::Builtin(name),
                    key_prefix: String::new(),
                    table: OnceLock::new(),
                    compiled: OnceLock::new(),
                },
            );
        }
        ProfileRegistry {
            entries: builtins.clone(),
            builtins,
        }
    }

    /// Built-ins, overridden by `dir/*.toml`, overridden by the inline profiles of `config_path`.
    pub fn load(
        dir: Option<&Path>,
        inline: &BTreeMap<String, toml::Table>,
        config_path: Option<&Path>,
    ) -> Result<Self> {
        let mut reg = Self::builtin();
        let mut from_dir: BTreeMap<String, Entry> = BTreeMap::new();
        if let Some(dir) = dir {
            let rd = std::fs::read_dir(dir).map_err(|source| ProfileError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            for item in rd {
                let item = item.map_err(|source| ProfileError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                let path = item.path();
                if path.extension().and_then(|e| e.to_str()) != Some("toml") || !path.is_file() {
                    continue;
                }
                let Some(name) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                let table = read_table(&path)?;
                from_dir.insert(
                    name,
                    Entry {
                        origin: Origin::File(path),
                        key_prefix: String::new(),
                        table: OnceLock::from(table),
                        compiled: OnceLock::new(),
                    },
                );
            }
        }
        // The directory overrides built-ins; inline profiles come last (and may not collide).
        for (name, entry) in &from_dir {
            reg.entries.insert(name.clone(), entry.clone());
        }
        let config_path = config_path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("corral.toml"));
        for (name, table) in inline {
            if let Some(other) = from_dir.get(name) {
                return Err(ProfileError::Duplicate {
                    name: name.clone(),
                    first: format!("{} [slm.sandbox_profiles.{name}]", config_path.display()),
                    second: other.origin.to_string(),
                });
            }
            validate_name(name).map_err(|message| ProfileError::Invalid {
                origin: config_path.display().to_string(),
                key: format!("slm.sandbox_profiles.{name}"),
                message,
            })?;
            reg.entries.insert(
                name.clone(),
                Entry {
                    origin: Origin::Inline {
                        config: config_path.clone(),
                    },
                    key_prefix: format!("slm.sandbox_profiles.{name}."),
                    table: OnceLock::from(table.clone()),
                    compiled: OnceLock::new(),
                },
            );
        }
        Ok(reg)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether `name` is a built-in profile not overridden by a file or the configuration.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| matches!(e.origin, Origin::Builtin(_)))
    }

    /// Where `name` is defined, for messages.
    pub fn origin_of(&self, name: &str) -> Option<String> {
        self.entries.get(name).map(|e| e.origin.to_string())
    }

    /// A profile by name (`secure`) or by path (anything containing `/` or ending in `.toml`).
    pub fn resolve(&self, name_or_path: &str) -> Result<Profile> {
        if name_or_path.contains('/') || name_or_path.ends_with(".toml") {
            let path = PathBuf::from(name_or_path);
            let table = read_table(&path)?;
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(name_or_path)
                .to_string();
            let entry = Entry {
                origin: Origin::File(path),
                key_prefix: String::new(),
                table: OnceLock::from(table),
                compiled: OnceLock::new(),
            };
            return self.compile(&name, &entry);
        }
        let entry = self
            .entries
            .get(name_or_path)
            .ok_or_else(|| ProfileError::NotFound {
                name: name_or_path.to_string(),
                known: self.entries.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        if let Some(p) = entry.compiled.get() {
            return Ok(p.clone());
        }
        let p = self.compile(name_or_path, entry)?;
        Ok(entry.compiled.get_or_init(|| p).clone())
    }

    fn compile(&self, name: &str, entry: &Entry) -> Result<Profile> {
        let origin = entry.origin.to_string();
        let merged = self.merged(name, entry, &mut vec![name.to_string()])?;
        let raw: RawProfile = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| {
                let path = e.path().to_string();
                let key = if path == "." {
                    entry.key_prefix.trim_end_matches('.').to_string()
                } else {
                    format!("{}{path}", entry.key_prefix)
                };
                ProfileError::Invalid {
                    origin: origin.clone(),
                    key,
                    message: e.into_inner().to_string(),
                }
            })?;
        validate::validate(name, &origin, raw).map_err(|inv| ProfileError::Invalid {
            origin: origin.clone(),
            key: format!("{}{}", entry.key_prefix, inv.key),
            message: inv.message,
        })
    }

    /// `entry` merged onto its base chain, `extends` removed.
    fn merged(&self, name: &str, entry: &Entry, chain: &mut Vec<String>) -> Result<toml::Table> {
        let mut table = entry.table().clone();
        let extends = match table.remove("extends") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(other) => {
                return Err(ProfileError::Invalid {
                    origin: entry.origin.to_string(),
                    key: format!("{}extends", entry.key_prefix),
                    message: format!("must be a profile name, got {}", other.type_str()),
                })
            }
        };
        let base_entry = match &extends {
            Some(base) => {
                if chain.contains(base) {
                    chain.push(base.clone());
                    return Err(ProfileError::ExtendsCycle {
                        origin: entry.origin.to_string(),
                        name: name.to_string(),
                        chain: chain.join(" -> "),
                    });
                }
                self.entries
                    .get(base)
                    .ok_or_else(|| ProfileError::Invalid {
                        origin: entry.origin.to_string(),
                        key: format!("{}extends", entry.key_prefix),
                        message: format!(
                            "no profile named '{base}' (known: {})",
                            self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    })?
            }
            // The built-in secure profile is complete and is the root of every chain.
            None if matches!(entry.origin, Origin::Builtin(n) if n == BASE_PROFILE) => {
                return Ok(table)
            }
            None => match self.builtins.get(BASE_PROFILE) {
                Some(b) => b,
                None => return Ok(table),
            },
        };
        let base_name = extends.unwrap_or_else(|| BASE_PROFILE.to_string());
        chain.push(base_name.clone());
        let mut base = self.merged(&base_name, base_entry, chain)?;
        // A base's description does not describe the profile built on it.
        if !table.contains_key("description") {
            base.remove("description");
        }
        merge(&mut base, table);
        Ok(base)
    }
}

/// A serde error's message without the location suffix toml adds (the key path says it).
pub(crate) fn serde_message(e: toml::de::Error) -> String {
    let m = e.message().to_string();
    m.split("\nin `")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid profile name (letters, digits, '-' and '_')"
        ))
    }
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text = crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES).map_err(|source| {
        ProfileError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
    toml::from_str(&text).map_err(|e| ProfileError::Parse {
        origin: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Deep merge: tables merge key by key, everything else (arrays included) is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid() {
        let reg = ProfileRegistry::builtin();
        for (name, _) in BUILTIN {
            let p = reg
                .resolve(name)
                .unwrap_or_else(|e| panic!("built-in {name}: {e}"));
            assert_eq!(p.name, *name);
        }
        let secure = reg.resolve("secure").unwrap();
        assert!(secure.strict_syscall_filtering);
        assert_eq!(secure.max_child_processes, 0);
        assert_eq!(secure.network, schema::NetworkAccessMode::None);
    }

    #[test]
    fn inline_profile_merges_onto_secure_and_names_its_key() {
        let mut inline = BTreeMap::new();
        let t: toml::Table = toml::from_str("[resources]\nmax_memory_mb = 256\n").unwrap();
        inline.insert("small".to_string(), t);
        let reg =
            ProfileRegistry::load(None, &inline, Some(Path::new("/etc/corral.toml"))).unwrap();
        let p = reg.resolve("small").unwrap();
        assert_eq!(p.max_memory_mb, 256);
        assert_eq!(
            p.max_child_processes, 0,
            "unspecified fields come from secure"
        );

        let bad: toml::Table =
            toml::from_str("[process_limits]\nmax_execution_time_seconds = 0\n").unwrap();
        inline.insert("bad".to_string(), bad);
        let reg =
            ProfileRegistry::load(None, &inline, Some(Path::new("/etc/corral.toml"))).unwrap();
        let err = reg.resolve("bad").unwrap_err().to_string();
        assert_eq!(
            err,
            "/etc/corral.toml: slm.sandbox_profiles.bad.process_limits.max_execution_time_seconds: must be > 0"
        );
    }

    #[test]
    fn extends_cycles_and_unknown_keys_are_errors() {
        let mut inline = BTreeMap::new();
        inline.insert(
            "a".to_string(),
            toml::from_str::<toml::Table>("extends = \"b\"").unwrap(),
        );
        inline.insert(
            "b".to_string(),
            toml::from_str::<toml::Table>("extends = \"a\"").unwrap(),
        );
        inline.insert(
            "c".to_string(),
            toml::from_str::<toml::Table>("[resources]\nmax_memroy_mb = 1").unwrap(),
        );
        let reg = ProfileRegistry::load(None, &inline, None).unwrap();
        assert!(matches!(
            reg.resolve("a"),
            Err(ProfileError::ExtendsCycle { .. })
        ));
        let err = reg.resolve("c").unwrap_err().to_string();
        assert!(
            err.contains("slm.sandbox_profiles.c.resources.max_memroy_mb"),
            "{err}"
        );
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn same_name_inline_and_in_directory_is_an_error_and_dir_overrides_builtin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fast.toml"),
            "[resources]\nmax_cpu_cores = 1.0\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("secure.toml"),
            "[resources]\nmax_memory_mb = 333\n",
        )
        .unwrap();
        let reg = ProfileRegistry::load(Some(dir.path()), &BTreeMap::new(), None).unwrap();
        assert_eq!(reg.resolve("fast").unwrap().max_cpu_cores, 1.0);
        assert_eq!(
            reg.resolve("secure").unwrap().max_memory_mb,
            333,
            "directory overrides the built-in"
        );
        let mut inline = BTreeMap::new();
        inline.insert("fast".to_string(), toml::Table::new());
        let err = ProfileRegistry::load(Some(dir.path()), &inline, Some(Path::new("c.toml")))
            .unwrap_err();
        assert!(matches!(err, ProfileError::Duplicate { .. }), "{err}");
        assert!(err.to_string().contains("fast.toml"), "{err}");
    }
}
