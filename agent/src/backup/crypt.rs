//! Encryption at rest (`backup.encryption`): [`EncryptedRepository`] wraps any
//! [`Repository`] and encrypts every object it stores with XChaCha20-Poly1305 in the
//! STREAM construction (`aead::stream`, big-endian 32-bit counter and last-chunk flag), so
//! that an object of any size is written and read in one pass.
//!
//! An encrypted object is a 36-byte header followed by chunks:
//!
//! ```text
//! magic "pgherdEC" (8) | version 1 (1) | key id (8) | nonce prefix (19, random per object)
//! chunk 0: 64 KiB of plaintext sealed (+16-byte tag), ...
//! last chunk: 0 to 64 KiB sealed with the last-chunk flag
//! ```
//!
//! Every chunk's nonce is the prefix, its number and the last-chunk flag, and the header is
//! the associated data of every chunk: a changed byte anywhere, chunks swapped, dropped or
//! cut off at the end, or a header pointing to another key all fail authentication, and
//! reading such an object is an error, never shorter data. The key id is the first 8 bytes
//! of the SHA-256 of the key, in hex: it says which key decrypts an object, so keys can be
//! rotated (the first key of `backup.encryption` encrypts, every key decrypts).

use std::io::{Read, Write};
use std::sync::Arc;

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{KeyInit, OsRng};
use chacha20poly1305::XChaCha20Poly1305;
use sha2::{Digest, Sha256};

use super::repo::{Entry, LocalRepository, RepoError, Repository};

const MAGIC: &[u8; 8] = b"pgherdEC";
const VERSION: u8 = 1;
const ID_LEN: usize = 8;
/// XChaCha20's 24-byte nonce less STREAM's 4-byte counter and 1-byte flag.
const PREFIX_LEN: usize = 19;
const HEADER_LEN: usize = MAGIC.len() + 1 + ID_LEN + PREFIX_LEN;
/// Plaintext bytes per chunk.
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;

/// One key: its id and its cipher. Neither `Debug` nor `Display`: key material is never
/// printed.
struct Key {
    id: [u8; ID_LEN],
    cipher: XChaCha20Poly1305,
}

/// The keys of `backup.encryption`: the first encrypts, every one decrypts.
pub struct Keys {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| hex::encode(k.id)))
            .finish()
    }
}

impl Keys {
    /// Parses keys, one per line: 32 bytes as 64 hex digits or as base64. Empty lines and
    /// lines starting with `#` are skipped. `source` names where they come from, for the
    /// error, which never quotes a line.
    pub fn parse(text: &str, source: &str) -> Result<Keys, String> {
        use base64::Engine;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = if line.len() == 64 && line.bytes().all(|b| b.is_ascii_hexdigit()) {
                hex::decode(line).ok()
            } else {
                base64::engine::general_purpose::STANDARD.decode(line).ok()
            };
            let Some(bytes) = bytes.filter(|b| b.len() == 32) else {
                return Err(format!(
                    "{source}: line {} is not a key: a key is 32 random bytes as 64 hex digits or as base64 (openssl rand -hex 32)",
                    n + 1
                ));
            };
            keys.push(Key::new(&bytes));
        }
        if keys.is_empty() {
            return Err(format!(
                "{source} holds no key: a key is 32 random bytes as 64 hex digits or as base64 (openssl rand -hex 32)"
            ));
        }
        Ok(Keys { keys })
    }

    /// The keys of `backup.encryption`: read from `key_file` (which must be root's or this
    /// process's user's, and private), or printed by `key_command` (run by `/bin/sh -c`).
    pub fn load(cfg: &pgherd_config::EncryptionConfig) -> Result<Keys, String> {
        match (&cfg.key_file, &cfg.key_command) {
            (Some(file), None) => {
                let key = "backup.encryption.key_file";
                let text = super::repo::read_private(file, key, "encryption keys")?;
                Keys::parse(&text, &format!("{key}: {}", file.display()))
            }
            (None, Some(command)) => {
                let key = "backup.encryption.key_command";
                let out = std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .output()
                    .map_err(|e| format!("{key}: cannot run /bin/sh: {e}"))?;
                if !out.status.success() {
                    // Its standard error may explain; its standard output may hold a key.
                    let err = String::from_utf8_lossy(&out.stderr);
                    let tail: Vec<&str> = err.lines().rev().take(3).collect();
                    return Err(format!(
                        "{key}: the command failed ({}){}",
                        out.status,
                        if tail.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ": {}",
                                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                            )
                        }
                    ));
                }
                let text = String::from_utf8(out.stdout).map_err(|_| {
                    format!("{key}: the command printed something that is not text")
                })?;
                Keys::parse(&text, key)
            }
            _ => Err("backup.encryption: set one of key_file and key_command".to_string()),
        }
    }

    /// The id of the key that encrypts, in hex.
    pub fn current_id(&self) -> String {
        hex::encode(self.keys[0].id)
    }

    /// Every key's id, in hex, the one that encrypts first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex::encode(k.id)).collect()
    }

    fn find(&self, id: &[u8]) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

impl Key {
    fn new(bytes: &[u8]) -> Key {
        let digest = Sha256::digest(bytes);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        Key {
            id,
            cipher: XChaCha20Poly1305::new_from_slice(bytes).expect("a key is 32 bytes"),
        }
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Encrypts what is written to it into `out`: the header first, then a sealed chunk each
/// time 64 KiB are buffered and more follow; [`EncryptWriter::finish`] seals the last.
pub struct EncryptWriter<'a> {
    out: &'a mut dyn Write,
    header: [u8; HEADER_LEN],
    stream: Option<EncryptorBE32<XChaCha20Poly1305>>,
    buf: Vec<u8>,
}

impl<'a> EncryptWriter<'a> {
    fn new(out: &'a mut dyn Write, keys: &Keys) -> std::io::Result<EncryptWriter<'a>> {
        use chacha20poly1305::aead::rand_core::RngCore;
        let key = &keys.keys[0];
        let mut prefix = [0u8; PREFIX_LEN];
        OsRng.fill_bytes(&mut prefix);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8] = VERSION;
        header[9..9 + ID_LEN].copy_from_slice(&key.id);
        header[9 + ID_LEN..].copy_from_slice(&prefix);
        out.write_all(&header)?;
        Ok(EncryptWriter {
            out,
            header,
            stream: Some(EncryptorBE32::from_aead(
                key.cipher.clone(),
                prefix.as_slice().into(),
            )),
            buf: Vec::with_capacity(CHUNK + TAG),
        })
    }

    /// Seals the last chunk: without it, the object reads as cut short.
    fn finish(mut self) -> std::io::Result<()> {
        let stream = self.stream.take().expect("finished once");
        stream
            .encrypt_last_in_place(&self.header, &mut self.buf)
            .map_err(|_| invalid("cannot encrypt".into()))?;
        self.out.write_all(&self.buf)
    }
}

impl Write for EncryptWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.len() == CHUNK {
            // More follows: this chunk is not the last.
            let stream = self.stream.as_mut().expect("not finished");
            stream
                .encrypt_next_in_place(&self.header, &mut self.buf)
                .map_err(|_| invalid("cannot encrypt: too many chunks".into()))?;
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Decrypts an object chunk by chunk; a chunk that fails authentication, or an object that
/// ends before its last chunk, is an error.
struct DecryptReader {
    inner: Box<dyn Read + Send>,
    what: String,
    header: [u8; HEADER_LEN],
    stream: Option<DecryptorBE32<XChaCha20Poly1305>>,
    /// Sealed bytes read ahead (up to a chunk and one byte, to tell the last chunk).
    sealed: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    chunk: u64,
}

/// Reads until `buf` holds `want` bytes or the input ends.
fn fill(inner: &mut dyn Read, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    while buf.len() < want {
        let have = buf.len();
        buf.resize(want, 0);
        match inner.read(&mut buf[have..]) {
            Ok(0) => {
                buf.truncate(have);
                return Ok(());
            }
            Ok(n) => buf.truncate(have + n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(have),
            Err(e) => {
                buf.truncate(have);
                return Err(e);
            }
        }
    }
    Ok(())
}

impl DecryptReader {
    fn open(
        mut inner: Box<dyn Read + Send>,
        keys: &Keys,
        what: String,
    ) -> std::io::Result<DecryptReader> {
        let mut head = Vec::with_capacity(HEADER_LEN);
        fill(&mut inner, &mut head, HEADER_LEN)?;
        if head.len() < HEADER_LEN || &head[..8] != MAGIC {
            return Err(invalid(format!(
                "{what} is not encrypted by pgherd (no encryption header): it was stored without backup.encryption, or damaged"
            )));
        }
        if head[8] != VERSION {
            return Err(invalid(format!(
                "{what} is in encryption format version {}, which this pgherd does not read",
                head[8]
            )));
        }
        let id = &head[9..9 + ID_LEN];
        let Some(key) = keys.find(id) else {
            return Err(invalid(format!(
                "{what} is encrypted with key {}, which backup.encryption does not hold (it holds {})",
                hex::encode(id),
                keys.ids().join(", ")
            )));
        };
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&head);
        Ok(DecryptReader {
            inner,
            what,
            header,
            stream: Some(DecryptorBE32::from_aead(
                key.cipher.clone(),
                head[9 + ID_LEN..].into(),
            )),
            sealed: Vec::with_capacity(CHUNK + TAG + 1),
            plain: Vec::with_capacity(CHUNK + TAG),
            pos: 0,
            chunk: 0,
        })
    }

    fn tampered(&self) -> std::io::Error {
        invalid(format!(
            "{}: chunk {} fails authentication: the object was changed, cut short or damaged",
            self.what, self.chunk
        ))
    }

    /// Decrypts the next chunk into `plain`; `false` at the end.
    fn next_chunk(&mut self) -> std::io::Result<bool> {
        if self.stream.is_none() {
            return Ok(false);
        }
        fill(&mut self.inner, &mut self.sealed, CHUNK + TAG + 1)?;
        self.plain.clear();
        self.pos = 0;
        if self.sealed.len() == CHUNK + TAG + 1 {
            self.plain.extend_from_slice(&self.sealed[..CHUNK + TAG]);
            self.sealed.drain(..CHUNK + TAG);
            let header = self.header;
            let stream = self.stream.as_mut().expect("checked");
            if stream
                .decrypt_next_in_place(&header, &mut self.plain)
                .is_err()
            {
                return Err(self.tampered());
            }
        } else {
            std::mem::swap(&mut self.plain, &mut self.sealed);
            let stream = self.stream.take().expect("checked");
            if self.plain.len() < TAG
                || stream
                    .decrypt_last_in_place(&self.header, &mut self.plain)
                    .is_err()
            {
                self.plain.clear();
                return Err(self.tampered());
            }
        }
        self.chunk += 1;
        Ok(true)
    }
}

impl Read for DecryptReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.plain.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A repository whose objects are encrypted: `put` encrypts, `open` decrypts and
/// authenticates, the rest passes through (names, sizes and dates are not secret).
pub struct EncryptedRepository {
    inner: Arc<dyn Repository>,
    keys: Keys,
}

impl EncryptedRepository {
    pub fn new(inner: Arc<dyn Repository>, keys: Keys) -> EncryptedRepository {
        EncryptedRepository { inner, keys }
    }
}

impl Repository for EncryptedRepository {
    fn put(
        &self,
        key: &str,
        source: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<u64, RepoError> {
        self.inner.put(key, &mut |w| {
            let mut enc = EncryptWriter::new(w, &self.keys)?;
            source(&mut enc)?;
            enc.finish()
        })
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let what = self.inner.describe(key);
        let raw = self.inner.open(key)?;
        let reader = DecryptReader::open(raw, &self.keys, what.clone())
            .map_err(|e| RepoError::io(&what, e))?;
        Ok(Box::new(reader))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RepoError> {
        self.inner.list(prefix)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        self.inner.list_dirs(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        self.inner.delete(key)
    }

    fn create_folder(&self, key: &str) -> Result<bool, RepoError> {
        self.inner.create_folder(key)
    }

    fn describe(&self, key: &str) -> String {
        self.inner.describe(key)
    }

    fn make_durable(&self, key: &str) -> Result<(), RepoError> {
        self.inner.make_durable(key)
    }

    fn as_local(&self) -> Option<&LocalRepository> {
        self.inner.as_local()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        hex::encode([n; 32])
    }

    fn repo(keys: &str) -> (tempfile::TempDir, EncryptedRepository) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("r")).unwrap();
        let inner = Arc::new(LocalRepository::new(dir.path().join("r")));
        let r = EncryptedRepository::new(inner, Keys::parse(keys, "test").unwrap());
        (dir, r)
    }

    fn read_all(r: &dyn Repository, key: &str) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.open(key)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .read_to_end(&mut out)?;
        Ok(out)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn round_trips_across_chunk_boundaries() {
        let (dir, r) = repo(&key(1));
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17] {
            let plain = data(len);
            // Written in odd pieces, as compressors do.
            let stored = r
                .put("o", &mut |w| {
                    for piece in plain.chunks(1000) {
                        w.write_all(piece)?;
                    }
                    Ok(())
                })
                .unwrap();
            let chunks = len / CHUNK + usize::from(len % CHUNK != 0 || len == 0);
            assert_eq!(stored as usize, HEADER_LEN + len + chunks * TAG, "{len}");
            assert_eq!(read_all(&r, "o").unwrap(), plain, "{len}");
            let raw = std::fs::read(dir.path().join("r/o")).unwrap();
            assert_eq!(&raw[..8], MAGIC);
            if len > 64 {
                assert!(!raw.windows(64).any(|w| w == &plain[..64]));
            }
        }
    }

    #[test]
    fn a_changed_byte_anywhere_is_an_error() {
        let (dir, r) = repo(&key(1));
        let plain = data(2 * CHUNK + 100);
        r.put("o", &mut |w| w.write_all(&plain)).unwrap();
        let path = dir.path().join("r/o");
        let good = std::fs::read(&path).unwrap();
        // In the header's nonce prefix, the first chunk, the second, the last one's tag.
        for at in [
            HEADER_LEN - 1,
            HEADER_LEN + 5,
            HEADER_LEN + CHUNK + TAG + 3,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            let err = read_all(&r, "o").unwrap_err();
            assert!(
                err.to_string().contains("fails authentication"),
                "{at}: {err}"
            );
        }
    }

    #[test]
    fn a_cut_short_or_reordered_object_is_an_error() {
        let (dir, r) = repo(&key(1));
        let plain = data(3 * CHUNK);
        r.put("o", &mut |w| w.write_all(&plain)).unwrap();
        let path = dir.path().join("r/o");
        let good = std::fs::read(&path).unwrap();
        let sealed = CHUNK + TAG;
        // At a chunk boundary (the rest would decrypt, but is not the last), inside a chunk,
        // the last chunk dropped, nothing but the header.
        for len in [
            HEADER_LEN + sealed,
            HEADER_LEN + 2 * sealed,
            HEADER_LEN + sealed + 10,
            good.len() - 1,
            HEADER_LEN,
        ] {
            std::fs::write(&path, &good[..len]).unwrap();
            let err = read_all(&r, "o").unwrap_err();
            assert!(
                err.to_string().contains("fails authentication"),
                "{len}: {err}"
            );
        }
        let mut swapped = good[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&good[HEADER_LEN + sealed..HEADER_LEN + 2 * sealed]);
        swapped.extend_from_slice(&good[HEADER_LEN..HEADER_LEN + sealed]);
        swapped.extend_from_slice(&good[HEADER_LEN + 2 * sealed..]);
        std::fs::write(&path, &swapped).unwrap();
        assert!(read_all(&r, "o").is_err());
        std::fs::write(&path, &good[..5]).unwrap();
        let err = read_all(&r, "o").unwrap_err();
        assert!(err.to_string().contains("not encrypted"), "{err}");
    }

    #[test]
    fn a_missing_key_is_named_and_an_old_key_still_decrypts() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Repository> = Arc::new(LocalRepository::new(dir.path()));
        let old = EncryptedRepository::new(inner.clone(), Keys::parse(&key(1), "t").unwrap());
        old.put("o", &mut |w| w.write_all(b"written with the old key"))
            .unwrap();
        let old_id = old.keys.current_id();

        let other = EncryptedRepository::new(inner.clone(), Keys::parse(&key(2), "t").unwrap());
        let err = read_all(&other, "o").unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "encrypted with key {old_id}, which backup.encryption does not hold"
            )),
            "{err}"
        );
        assert!(!err.contains(&key(1)) && !err.contains(&key(2)), "{err}");

        // Rotated: the new key first encrypts, the old one still decrypts.
        let rotated = EncryptedRepository::new(
            inner.clone(),
            Keys::parse(&format!("# new\n{}\n\n{}\n", key(2), key(1)), "t").unwrap(),
        );
        assert_eq!(
            read_all(&rotated, "o").unwrap(),
            b"written with the old key"
        );
        rotated.put("n", &mut |w| w.write_all(b"new")).unwrap();
        assert!(read_all(&old, "n")
            .unwrap_err()
            .to_string()
            .contains(&rotated.keys.current_id()));
        assert_eq!(read_all(&other, "n").unwrap(), b"new");
    }

    #[test]
    fn key_text_is_checked_and_never_quoted() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
        let k = Keys::parse(&format!("{b64}\n"), "t").unwrap();
        assert_eq!(k.ids().len(), 1);
        assert_eq!(k.current_id(), hex::encode(&Sha256::digest([3u8; 32])[..8]));
        let err = Keys::parse("# c\nnot-a-key-secret\n", "f").unwrap_err();
        assert!(
            err.contains("line 2 is not a key") && !err.contains("secret"),
            "{err}"
        );
        assert!(Keys::parse(&hex::encode([1u8; 16]), "f").is_err());
        assert!(Keys::parse("# nothing\n", "f")
            .unwrap_err()
            .contains("holds no key"));
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_and_a_command_can_print_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, key(5)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let cfg = pgherd_config::EncryptionConfig {
            key_file: Some(file.clone()),
            key_command: None,
        };
        let err = Keys::load(&cfg).unwrap_err();
        assert!(
            err.contains("backup.encryption.key_file") && err.contains("0640"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let from_file = Keys::load(&cfg).unwrap().current_id();
        let cmd = pgherd_config::EncryptionConfig {
            key_file: None,
            key_command: Some(format!("cat {}", file.display())),
        };
        assert_eq!(Keys::load(&cmd).unwrap().current_id(), from_file);
        let failing = pgherd_config::EncryptionConfig {
            key_file: None,
            key_command: Some("echo vault is sealed >&2; exit 3".into()),
        };
        let err = Keys::load(&failing).unwrap_err();
        assert!(err.contains("vault is sealed"), "{err}");
    }
}
