//! Reading files a user points corral at (configuration, profiles, catalogs) without letting the
//! path wedge or swamp the process: opened non-blocking (a FIFO cannot hold the open, and a
//! reload or shutdown behind it), refused unless a regular file (a character device such as
//! `/dev/zero` behind a symlink is not read), and read up to a size limit.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Configuration-like files are small: 4 MiB is far beyond any real one.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Opens `p` for reading without blocking and only if it is a regular file.
pub fn open_regular(p: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// The UTF-8 text of the regular file `p`, refused past `max` bytes.
pub fn read_text(p: &Path, max: u64) -> io::Result<String> {
    let f = open_regular(p)?;
    let mut text = String::new();
    f.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes; not a configuration file"),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_huge_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a C string we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = read_text(&fifo, MAX_CONFIG_BYTES).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));

        let zero = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = read_text(&zero, MAX_CONFIG_BYTES).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");

        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; 1025]).unwrap();
        let e = read_text(&big, 1024).unwrap_err();
        assert!(e.to_string().contains("larger than 1024 bytes"), "{e}");
        std::fs::write(&big, "a = 1\n").unwrap();
        assert_eq!(read_text(&big, 1024).unwrap(), "a = 1\n");
    }
}
