//! Audit keys. One 256-bit master key per writer, from a key file (mode 0600 or stricter) or
//! `CORRAL_LOG_KEY`, written as base64 or hex. Everything else is derived from it once, when the
//! key is loaded (no per-entry key derivation, no password hashing: the key is random, not a
//! password):
//!
//! - key id: the first 8 bytes of SHA-256(`corral-audit-v1 key-id` ‖ 0 ‖ key), stored in every
//!   record so a reader holding several keys (after a rotation) picks the right one;
//! - encryption subkey: HMAC-SHA256(key, `corral-audit-v1 encryption`), for AES-256-GCM;
//! - chain subkey: HMAC-SHA256(key, `corral-audit-v1 chain`), for the record and checkpoint MACs.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{AuditError, Result};

type HmacSha256 = Hmac<Sha256>;

/// Length of a key, in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a record MAC, in bytes.
pub const MAC_LEN: usize = 32;
/// Length of an AES-GCM nonce, in bytes (96 bits, always random).
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag, in bytes.
pub const TAG_LEN: usize = 16;
/// An entry MAC's fixed-length tail: nonce and GCM tag of the request, then of the response.
pub const ENTRY_PAYLOADS_LEN: usize = 2 * (NONCE_LEN + TAG_LEN);
/// The key file corral generates in the audit directory when no key is configured.
pub const DEFAULT_KEY_FILE: &str = "audit.key";

/// A key id: 8 bytes, written as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A loaded audit key with its derived subkeys. Cheap to clone (shared); `Debug` shows the key
/// id only.
#[derive(Clone)]
pub struct AuditKey {
    id: KeyId,
    id_hex: String,
    subkeys: Arc<Subkeys>,
}

struct Subkeys {
    aead: Aes256Gcm,
    chain: HmacSha256,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditKey({})", self.id)
    }
}

impl AuditKey {
    /// The key and its subkeys, from 32 raw bytes.
    pub fn from_bytes(key: &[u8; KEY_LEN]) -> AuditKey {
        let mut h = Sha256::new();
        h.update(b"corral-audit-v1 key-id\0");
        h.update(key);
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        let enc = subkey(key, b"corral-audit-v1 encryption");
        let chain = subkey(key, b"corral-audit-v1 chain");
        AuditKey {
            id: KeyId(id),
            id_hex: hex(&id),
            subkeys: Arc::new(Subkeys {
                aead: Aes256Gcm::new(&enc.into()),
                chain: hmac_with(&chain),
            }),
        }
    }

    /// Parses a key written as base64 (standard or URL-safe, padded or not) or 64 hex digits.
    /// `origin` names where it came from in errors (`environment variable CORRAL_LOG_KEY`).
    pub fn parse(text: &str, origin: &str) -> Result<AuditKey> {
        let t = text.trim();
        let bytes = if t.len() == 2 * KEY_LEN && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            unhex(t)
        } else {
            [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ]
            .into_iter()
            .find_map(|e| e.decode(t).ok())
        };
        let bad = |message: String| AuditError::BadKey {
            origin: origin.to_string(),
            message,
        };
        let bytes = bytes.ok_or_else(|| {
            bad(
                "not base64 or hex: expected a 256-bit key as `corral logs keygen` writes it"
                    .into(),
            )
        })?;
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            bad(format!(
                "{} bytes, expected {KEY_LEN} (a 256-bit key, base64 or hex)",
                bytes.len()
            ))
        })?;
        Ok(AuditKey::from_bytes(&key))
    }

    /// A new random key and its base64 text.
    pub fn generate() -> Result<(AuditKey, String)> {
        let mut key = [0u8; KEY_LEN];
        random(&mut key)?;
        let text = base64::engine::general_purpose::STANDARD.encode(key);
        Ok((AuditKey::from_bytes(&key), text))
    }

    /// Loads a key file. Refuses a file that group or others may access at all (mode & 0o077),
    /// naming the path and the mode.
    pub fn load(path: &Path) -> Result<AuditKey> {
        let meta = std::fs::metadata(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                AuditError::KeyFileMissing {
                    path: path.to_path_buf(),
                }
            } else {
                AuditError::KeyFileIo {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuditError::KeyFileMode {
                path: path.to_path_buf(),
                mode,
            });
        }
        if !meta.is_file() {
            return Err(AuditError::BadKey {
                origin: path.display().to_string(),
                message: "not a regular file".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| AuditError::KeyFileIo {
            path: path.to_path_buf(),
            source,
        })?;
        AuditKey::parse(&text, &path.display().to_string())
    }

    /// Generates a key into a new file created with mode 0600 (its directory, if missing, 0700).
    /// Never overwrites: an existing file is [`AuditError::KeyExists`].
    pub fn generate_file(path: &Path) -> Result<AuditKey> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| AuditError::KeyFileIo {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let (key, text) = AuditKey::generate()?;
        let io = |source| AuditError::KeyFileIo {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    AuditError::KeyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    io(e)
                }
            })?;
        f.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(key)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key id as 16 hex digits, as records store it.
    pub fn id_hex(&self) -> &str {
        &self.id_hex
    }

    /// MAC of one record body: HMAC(chain key, `corral-audit-v1 record` ‖ 0 ‖ body). The body
    /// holds the previous record's MAC, so this chains.
    pub fn record_mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        self.mac(b"corral-audit-v1 record\0", body)
    }

    /// Checks a record MAC in constant time.
    pub fn verify_record_mac(&self, body: &[u8], mac: &[u8; MAC_LEN]) -> bool {
        let mut m = self.subkeys.chain.clone();
        m.update(b"corral-audit-v1 record\0");
        m.update(body);
        m.verify_slice(mac).is_ok()
    }

    /// MAC of an `entry` record: HMAC(chain key, `corral-audit-v1 entry` ‖ 0 ‖ `head` ‖
    /// `payloads`), where `head` is the record's body up to the end of its `meta` object (type,
    /// seq, kid, prev, the exact metadata bytes) and `payloads` is the request's nonce and GCM tag
    /// then the response's ([`ENTRY_PAYLOADS_LEN`] bytes, fixed, so the input is unambiguous).
    /// The ciphertexts are covered through their tags, which authenticate them (and the metadata)
    /// under the encryption key. A separate domain from other records.
    pub fn entry_mac(&self, head: &[u8], payloads: &[u8; ENTRY_PAYLOADS_LEN]) -> [u8; MAC_LEN] {
        self.entry_hmac(head, payloads)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks an entry MAC ([`AuditKey::entry_mac`]) in constant time.
    pub fn verify_entry_mac(
        &self,
        head: &[u8],
        payloads: &[u8; ENTRY_PAYLOADS_LEN],
        mac: &[u8; MAC_LEN],
    ) -> bool {
        self.entry_hmac(head, payloads).verify_slice(mac).is_ok()
    }

    fn entry_hmac(&self, head: &[u8], payloads: &[u8; ENTRY_PAYLOADS_LEN]) -> HmacSha256 {
        let mut m = self.subkeys.chain.clone();
        m.update(b"corral-audit-v1 entry\0");
        m.update(head);
        m.update(payloads);
        m
    }

    /// MAC of the checkpoint file's body (a different domain from records, so neither can be
    /// passed off as the other).
    pub fn checkpoint_mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        self.mac(b"corral-audit-v1 checkpoint\0", body)
    }

    fn mac(&self, domain: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.subkeys.chain.clone();
        m.update(domain);
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// Encrypts `buf` in place; returns the tag.
    pub(crate) fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        ad: &[&[u8]],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let ad = ad.concat();
        self.subkeys
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(nonce), &ad, buf)
            .map(Into::into)
            .map_err(|_| {
                AuditError::Writer("AES-GCM refused to encrypt (payload too large)".into())
            })
    }

    /// Decrypts `buf` in place; `false` when the tag does not match (wrong key, or the
    /// ciphertext, nonce or associated data changed).
    pub(crate) fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        ad: &[&[u8]],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> bool {
        let ad = ad.concat();
        self.subkeys
            .aead
            .decrypt_in_place_detached(Nonce::from_slice(nonce), &ad, buf, Tag::from_slice(tag))
            .is_ok()
    }
}

/// The keys a reader holds, by key id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<AuditKey>,
}

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Adds a key (a key already held is ignored).
    pub fn add(&mut self, key: AuditKey) {
        if self.get_id(key.id()).is_none() {
            self.keys.push(key);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key with this id, written as records store it (16 hex digits).
    pub fn get(&self, kid_hex: &str) -> Option<&AuditKey> {
        self.keys.iter().find(|k| k.id_hex == kid_hex)
    }

    fn get_id(&self, id: KeyId) -> Option<&AuditKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The ids held, for messages.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id_hex.clone()).collect()
    }
}

impl From<AuditKey> for Keyring {
    fn from(key: AuditKey) -> Keyring {
        Keyring { keys: vec![key] }
    }
}

fn hmac_with(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

fn subkey(key: &[u8; KEY_LEN], label: &[u8]) -> [u8; KEY_LEN] {
    let mut m = hmac_with(key);
    m.update(label);
    m.finalize().into_bytes().into()
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| AuditError::Random(e.to_string()))
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

/// Appends lower-case hex of `bytes` to `out`.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

/// Decodes hex (either case); `None` for an odd length or a non-hex digit.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn base64_and_hex_give_the_same_key_and_id() {
        let raw = [7u8; KEY_LEN];
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let a = AuditKey::parse(&format!("  {b64}\n"), "test").unwrap();
        let b = AuditKey::parse(&hex(&raw).to_uppercase(), "test").unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id_hex().len(), 16);
        assert_eq!(a.record_mac(b"x"), b.record_mac(b"x"));
        assert_ne!(a.record_mac(b"x"), a.checkpoint_mac(b"x"), "domains differ");
        let other = AuditKey::from_bytes(&[8u8; KEY_LEN]);
        assert_ne!(a.id(), other.id());
        assert_eq!(
            format!("{a:?}"),
            format!("AuditKey({})", a.id()),
            "Debug shows no key"
        );
    }

    #[test]
    fn short_or_garbled_keys_are_refused_with_their_origin() {
        let err = AuditKey::parse("c2hvcnQ=", "environment variable CORRAL_LOG_KEY")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "audit key from environment variable CORRAL_LOG_KEY: 5 bytes, expected 32 (a 256-bit key, base64 or hex)"
        );
        let err = AuditKey::parse("not a key!", "x").unwrap_err().to_string();
        assert!(err.contains("not base64 or hex"), "{err}");
    }

    #[test]
    fn key_files_are_0600_never_overwritten_and_loose_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/k.key");
        let k = AuditKey::generate_file(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let parent = std::fs::metadata(p.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(parent, 0o700);
        assert_eq!(AuditKey::load(&p).unwrap().id(), k.id());
        assert!(matches!(
            AuditKey::generate_file(&p),
            Err(AuditError::KeyExists { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = AuditKey::load(&p).unwrap_err().to_string();
        assert!(
            err.contains(&p.display().to_string()) && err.contains("mode 0640"),
            "{err}"
        );
        let err = AuditKey::load(&dir.path().join("none")).unwrap_err();
        assert!(matches!(err, AuditError::KeyFileMissing { .. }));
    }

    #[test]
    fn gcm_round_trip_and_tamper() {
        let k = AuditKey::from_bytes(&[1u8; KEY_LEN]);
        let nonce = [3u8; NONCE_LEN];
        let mut buf = b"hello".to_vec();
        let tag = k.seal(&nonce, &[b"ad"], &mut buf).unwrap();
        assert_ne!(buf, b"hello");
        let mut ok = buf.clone();
        assert!(k.open(&nonce, &[b"ad"], &mut ok, &tag));
        assert_eq!(ok, b"hello");
        let mut wrong_ad = buf.clone();
        assert!(!k.open(&nonce, &[b"AD"], &mut wrong_ad, &tag));
        let other = AuditKey::from_bytes(&[2u8; KEY_LEN]);
        let mut wrong_key = buf.clone();
        assert!(!other.open(&nonce, &[b"ad"], &mut wrong_key, &tag));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00ABff").unwrap(), vec![0, 0xab, 0xff]);
        assert!(unhex("0g").is_none());
        assert!(unhex("abc").is_none());
    }
}
