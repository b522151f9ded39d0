//! The files a command needs to start: its ELF interpreter and shared libraries, found the way
//! the dynamic loader finds them, without running anything (never `ldd` on an untrusted binary).
//!
//! The planner binds each of them read-only into the sandbox and gives exactly these files the
//! Landlock execute right; read_paths never imply execute.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an ELF executable or script for this machine: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: needs shared library '{lib}', which is not in any library directory")]
    MissingLibrary { path: PathBuf, lib: String },
}

/// One file a command needs to start, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    /// As the loader names it (possibly through symlinks).
    pub path: PathBuf,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The command itself.
    Command,
    /// The interpreter a `#!` script names.
    ScriptInterpreter,
    /// The ELF interpreter (dynamic loader) of `of`.
    Interpreter { of: PathBuf },
    /// A shared library `of` lists as needed.
    Library { of: PathBuf },
}

impl Needed {
    /// What this file is to the command, for messages ("a shared library /bin/ls needs").
    pub fn describe(&self) -> String {
        match &self.role {
            Role::Command => "the command itself".into(),
            Role::ScriptInterpreter => "the script's interpreter".into(),
            Role::Interpreter { of } => format!("the dynamic loader {} needs", of.display()),
            Role::Library { of } => format!("a shared library {} needs", of.display()),
        }
    }
}

/// `exe`, the interpreter of a `#!` script (one level), the ELF interpreter and every needed
/// library, recursively, in that order. Libraries are searched as the dynamic loader does:
/// DT_RPATH (unless DT_RUNPATH), DT_RUNPATH, then — when the loader can read its cache
/// (`use_ld_cache`) — the directories of /etc/ld.so.conf the cache is built from, then the
/// loader's built-in directories.
pub fn exec_closure(exe: &Path, use_ld_cache: bool) -> Result<Vec<Needed>, ElfError> {
    let mut out = vec![Needed {
        path: exe.to_path_buf(),
        role: Role::Command,
    }];
    let head = read_head(exe)?;
    let elf_root = if head.starts_with(b"#!") {
        let line = head[2..].split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let interp = line.split_whitespace().next().unwrap_or_default();
        if !interp.starts_with('/') {
            return Err(ElfError::Format {
                path: exe.into(),
                reason: format!("script interpreter '{interp}' is not an absolute path"),
            });
        }
        out.push(Needed {
            path: PathBuf::from(interp),
            role: Role::ScriptInterpreter,
        });
        PathBuf::from(interp)
    } else {
        exe.to_path_buf()
    };
    let dirs = library_dirs(use_ld_cache);
    let mut seen = BTreeSet::new();
    let mut queue = vec![elf_root];
    let mut machine = None;
    let listed = |out: &Vec<Needed>, p: &Path| out.iter().any(|n| n.path == p);
    while let Some(file) = queue.pop() {
        let canon = fs::canonicalize(&file).map_err(|source| ElfError::Io {
            path: file.clone(),
            source,
        })?;
        if !seen.insert(canon.clone()) {
            continue;
        }
        let elf = DynInfo::read(&canon).map_err(|reason| ElfError::Format {
            path: file.clone(),
            reason,
        })?;
        let m = *machine.get_or_insert(elf.machine);
        if elf.machine != m {
            return Err(ElfError::Format {
                path: file.clone(),
                reason: "mixed machine types".into(),
            });
        }
        if let Some(interp) = &elf.interpreter {
            let p = PathBuf::from(interp);
            if !listed(&out, &p) {
                out.push(Needed {
                    path: p.clone(),
                    role: Role::Interpreter { of: file.clone() },
                });
                queue.push(p);
            }
        }
        let origin = canon.parent().map(Path::to_path_buf).unwrap_or_default();
        let expand = |s: &str| -> Vec<PathBuf> {
            s.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| {
                    PathBuf::from(
                        d.replace("$ORIGIN", &origin.to_string_lossy())
                            .replace("${ORIGIN}", &origin.to_string_lossy()),
                    )
                })
                .collect()
        };
        // DT_RPATH is ignored when DT_RUNPATH is present, as the loader does.
        let mut search: Vec<PathBuf> = Vec::new();
        if elf.runpaths.is_empty() {
            elf.rpaths.iter().for_each(|r| search.extend(expand(r)));
        }
        elf.runpaths.iter().for_each(|r| search.extend(expand(r)));
        search.extend(dirs.iter().cloned());
        for lib in &elf.libraries {
            let found = if lib.contains('/') {
                Some(PathBuf::from(lib))
            } else {
                search
                    .iter()
                    .map(|d| d.join(lib))
                    .find(|p| is_elf_for(p, m))
            };
            let Some(found) = found else {
                return Err(ElfError::MissingLibrary {
                    path: file.clone(),
                    lib: (*lib).to_string(),
                });
            };
            if !listed(&out, &found) {
                out.push(Needed {
                    path: found.clone(),
                    role: Role::Library { of: file.clone() },
                });
            }
            queue.push(found);
        }
    }
    Ok(out)
}

/// What the loader needs from an ELF file, read with a few `pread`s: the machine, the
/// interpreter, and the dynamic section's needed libraries and search paths. Only 64-bit
/// little-endian files (x86_64, aarch64), which is what corral runs on.
#[derive(Debug, Default)]
struct DynInfo {
    machine: u16,
    interpreter: Option<String>,
    libraries: Vec<String>,
    rpaths: Vec<String>,
    runpaths: Vec<String>,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

impl DynInfo {
    fn read(path: &Path) -> Result<DynInfo, String> {
        let f = crate::files::open_regular(path).map_err(|e| e.to_string())?;
        let at = |off: u64, len: usize| -> Result<Vec<u8>, String> {
            if len > 64 << 20 {
                return Err("oversized ELF structure".into());
            }
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, off)
                .map_err(|e| format!("truncated ELF file: {e}"))?;
            Ok(b)
        };
        let h = at(0, 64)?;
        if &h[..4] != b"\x7fELF" {
            return Err("not an ELF file".into());
        }
        if h[4] != 2 || h[5] != 1 {
            return Err("not a 64-bit little-endian ELF file".into());
        }
        let u16_ = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_ = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_ = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let machine = u16_(&h, 18);
        let (phoff, phentsize, phnum) = (
            u64_(&h, 32),
            usize::from(u16_(&h, 54)),
            usize::from(u16_(&h, 56)),
        );
        if phentsize < 56 {
            return Err("bad program header size".into());
        }
        let ph = at(phoff, phentsize * phnum)?;
        let mut info = DynInfo {
            machine,
            ..DynInfo::default()
        };
        let mut loads = Vec::new();
        let mut dynamic = None;
        for i in 0..phnum {
            let p = &ph[i * phentsize..];
            let (ty, off, vaddr, filesz) = (u32_(p, 0), u64_(p, 8), u64_(p, 16), u64_(p, 32));
            match ty {
                PT_LOAD => loads.push((vaddr, off, filesz)),
                PT_DYNAMIC => dynamic = Some((off, filesz)),
                PT_INTERP => {
                    let s = at(off, usize::try_from(filesz).map_err(|e| e.to_string())?)?;
                    info.interpreter = Some(
                        String::from_utf8_lossy(s.split(|b| *b == 0).next().unwrap_or_default())
                            .into_owned(),
                    );
                }
                _ => {}
            }
        }
        let Some((doff, dsize)) = dynamic else {
            return Ok(info);
        }; // static executable
        let d = at(doff, usize::try_from(dsize).map_err(|e| e.to_string())?)?;
        let (mut strtab, mut strsz) = (None, 0u64);
        let mut entries = Vec::new();
        for e in d.chunks_exact(16) {
            let (tag, val) = (u64_(e, 0), u64_(e, 8));
            match tag {
                0 => break,
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = val,
                DT_NEEDED | DT_RPATH | DT_RUNPATH => entries.push((tag, val)),
                _ => {}
            }
        }
        let Some(strtab) = strtab else {
            return Ok(info);
        };
        // The string table is named by address: find the loaded segment holding it.
        let (vaddr, off, _) = loads
            .iter()
            .find(|(v, _, sz)| strtab >= *v && v.checked_add(*sz).is_some_and(|end| strtab < end))
            .ok_or("string table outside the loaded segments")?;
        let table_off = (strtab - vaddr)
            .checked_add(*off)
            .ok_or("string table offset overflows")?;
        let strings = at(
            table_off,
            usize::try_from(strsz).map_err(|e| e.to_string())?,
        )?;
        let name = |o: u64| -> String {
            let o = usize::try_from(o).unwrap_or(usize::MAX).min(strings.len());
            String::from_utf8_lossy(strings[o..].split(|b| *b == 0).next().unwrap_or_default())
                .into_owned()
        };
        for (tag, val) in entries {
            match tag {
                DT_NEEDED => info.libraries.push(name(val)),
                DT_RPATH => info.rpaths.push(name(val)),
                _ => info.runpaths.push(name(val)),
            }
        }
        Ok(info)
    }
}

fn read_head(p: &Path) -> Result<Vec<u8>, ElfError> {
    use std::io::Read;
    let mut f = crate::files::open_regular(p).map_err(|source| ElfError::Io {
        path: p.into(),
        source,
    })?;
    let mut buf = vec![0u8; 256];
    let n = f.read(&mut buf).map_err(|source| ElfError::Io {
        path: p.into(),
        source,
    })?;
    buf.truncate(n);
    Ok(buf)
}

fn is_elf_for(p: &Path, machine: u16) -> bool {
    let Ok(head) = read_head(p) else { return false };
    head.len() >= 20
        && head.starts_with(b"\x7fELF")
        && u16::from_le_bytes([head[18], head[19]]) == machine
}

/// Library directories in loader order: /etc/ld.so.conf (with includes) when the loader uses
/// its cache (which ldconfig builds from them), then the loader's built-in directories.
pub fn library_dirs(use_ld_cache: bool) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if use_ld_cache {
        read_ld_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    }
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        let p = PathBuf::from(d);
        if !dirs.contains(&p) {
            dirs.push(p);
        }
    }
    dirs
}

fn read_ld_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    if depth > 4 {
        return;
    }
    let Ok(text) = crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if let Some(pattern) = line.strip_prefix("include ") {
            let pattern = pattern.trim();
            let (dir, suffix) = match pattern.rsplit_once('/') {
                Some((d, f)) => (PathBuf::from(d), f.trim_start_matches('*').to_string()),
                None => continue,
            };
            let mut files: Vec<PathBuf> = fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.to_string_lossy().ends_with(&suffix))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            for f in files {
                read_ld_conf(&f, dirs, depth + 1);
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_loader_and_libc_of_a_system_binary() {
        let needed = exec_closure(Path::new("/bin/ls"), true).unwrap();
        assert_eq!(needed[0].role, Role::Command);
        assert!(needed
            .iter()
            .any(|n| matches!(n.role, Role::Interpreter { .. })));
        let closure: Vec<PathBuf> = needed.into_iter().map(|n| n.path).collect();
        assert_eq!(closure[0], PathBuf::from("/bin/ls"));
        assert!(
            closure
                .iter()
                .any(|p| p.to_string_lossy().contains("ld-linux")),
            "{closure:?}"
        );
        assert!(
            closure
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == "libc.so.6")),
            "{closure:?}"
        );
    }

    #[test]
    fn scripts_bring_their_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s.sh");
        fs::write(&s, "#!/bin/sh\necho hi\n").unwrap();
        let closure = exec_closure(&s, true).unwrap();
        assert_eq!(closure[1].path, PathBuf::from("/bin/sh"));
        assert_eq!(closure[1].role, Role::ScriptInterpreter);
        let bad = dir.path().join("b.sh");
        fs::write(&bad, "#!sh\n").unwrap();
        assert!(matches!(
            exec_closure(&bad, true),
            Err(ElfError::Format { .. })
        ));
    }
}
