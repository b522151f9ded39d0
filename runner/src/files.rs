//! Reading a model's file: its bytes and their sha256 in one pass, and memory backed before it is
//! written.

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Asks the kernel to back `buf` with memory now, in one call, instead of one page fault per
/// page as it is first written: faults were half of loading a model (each is a trap, and on a VM
/// a costly one); Gemma 3 270M's weights took ~300 ms to lay out instead of ~365. Only whole
/// pages inside `buf`; an error (a kernel before 5.14) changes nothing.
pub fn populate<T>(buf: &mut [MaybeUninit<T>]) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    const PAGE: usize = 4096;
    let start = buf.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buf);
    let (a, b) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
    if b > a {
        // SAFETY: the range lies inside memory this slice owns; populating it writes nothing
        // the program can see (fresh pages read as zero either way).
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, MADV_POPULATE_WRITE) };
    }
}

/// A whole file with the sha256 of exactly the bytes returned. A second thread hashes each
/// chunk as soon as it has been read, so hashing costs little more than reading (a 253 MB model
/// took 145 ms to read and then 140 ms to hash; together ~150 ms on two cores). Fails for what is
/// not a regular file, and when the file is shorter or longer than its size said when it was
/// opened (it changed meanwhile).
pub fn read_hashed(path: &Path) -> io::Result<(Vec<u8>, String)> {
    read_hashed_in(path, 8 << 20)
}

fn read_hashed_in(path: &Path, chunk: usize) -> io::Result<(Vec<u8>, String)> {
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let len = usize::try_from(meta.len())
        .map_err(|_| io::Error::other("the file is larger than memory can address"))?;
    // Zeroed by the allocator's fresh mapping (no memset). Not populated first: measured, the
    // reads fault its pages in for less than a separate pass does.
    let mut buf = vec![0u8; len];
    let data: &mut [u8] = &mut buf;
    let hash = std::thread::scope(|s| -> io::Result<String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(4);
        let hasher = std::thread::Builder::new()
            .name("hash".into())
            .spawn_scoped(s, move || {
                let mut h = Sha256::new();
                for c in rx {
                    h.update(c);
                }
                h.finalize()
            })?;
        let mut read = Ok(());
        for part in data.chunks_mut(chunk.max(1)) {
            if let Err(e) = f.read_exact(part) {
                read = Err(e);
                break;
            }
            let part: &[u8] = part;
            if tx.send(part).is_err() {
                break;
            }
        }
        drop(tx);
        let d = hasher
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"))?;
        read?;
        Ok(corral_protocol::digest::hex(&d))
    })?;
    let mut more = [0u8; 1];
    if f.read(&mut more)? != 0 {
        return Err(io::Error::other("the file grew while it was read"));
    }
    Ok((buf, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes and the digest are the file's, whatever its size against the chunk size
    /// (empty, inside one chunk, on and across chunk boundaries), the digest the same as the
    /// supervisor's.
    #[test]
    fn a_file_read_and_hashed_together_gives_its_bytes_and_their_sha256() {
        let path = std::env::temp_dir().join(format!("corral-read-hashed-{}", std::process::id()));
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 5, 3 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            let (got, hash) = read_hashed_in(&path, 4096).unwrap();
            assert_eq!(got, bytes, "{len} bytes");
            assert_eq!(
                hash,
                corral_protocol::digest::sha256_hex(&bytes),
                "{len} bytes"
            );
        }
        std::fs::remove_file(&path).unwrap();
        assert!(read_hashed(&path).is_err(), "a missing file is an error");
        assert!(
            read_hashed(&std::env::temp_dir()).is_err(),
            "a directory is an error"
        );
    }

    /// Populating leaves the memory as it was: zero where fresh, and what was written kept.
    #[test]
    fn populated_memory_reads_as_before() {
        let mut v: Vec<u32> = Vec::with_capacity(1 << 20);
        v.extend(0..1000);
        populate(v.spare_capacity_mut());
        assert!(v.iter().copied().eq(0..1000));
        v.resize(1 << 20, 0);
        assert!(v[1000..].iter().all(|x| *x == 0));
    }
}
