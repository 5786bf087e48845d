//! Sealing of message bodies at rest: AES-256-GCM (openssl) with a random 96-bit nonce per
//! message, associated data binding the ciphertext to its room, seq, sender and sent-at time
//! (see [`Binding`]), and a key id per row so keys can rotate. Owns the [`Keyring`] and the
//! key check values that tell a stored key id's real key from another; reads and writes only
//! the key file.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::CryptoError;
use crate::ids::{RoomId, Seq, UserId};
use crate::secret::Secret;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;

struct Key([u8; KEY_LEN]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// A body sealed under key `key_id`: `ciphertext` is the encrypted body followed by the GCM tag;
/// `aad_version` says which associated data it was sealed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: i32,
    pub aad_version: i16,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// Rows written before the sender and time were bound: room and seq only.
pub const AAD_ROOM_SEQ: i16 = 1;
/// Room, seq, sender and sent-at: what [`Keyring::seal`] writes.
pub const AAD_BOUND: i16 = 2;

/// What a ciphertext is bound to: whoever can write the database but holds no key cannot move
/// a body to another room or seq, or pass it off as someone else's or as sent at another time,
/// without it failing to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub room: RoomId,
    pub seq: Seq,
    pub sender: UserId,
    /// Microseconds since the Unix epoch, as Postgres stores `created_at`.
    pub sent_at_micros: i64,
}

impl Binding {
    fn aad(&self, version: i16) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(40);
        match version {
            AAD_ROOM_SEQ => {
                out.extend_from_slice(b"rookery1");
                out.extend_from_slice(&self.room.0.to_be_bytes());
                out.extend_from_slice(&self.seq.0.to_be_bytes());
            }
            AAD_BOUND => {
                out.extend_from_slice(b"rookery2");
                out.extend_from_slice(&self.room.0.to_be_bytes());
                out.extend_from_slice(&self.seq.0.to_be_bytes());
                out.extend_from_slice(&self.sender.0.to_be_bytes());
                out.extend_from_slice(&self.sent_at_micros.to_be_bytes());
            }
            other => return Err(CryptoError::UnknownFormat(other)),
        }
        Ok(out)
    }
}

/// A key id as the database remembers it: the check value of the key that first sealed with
/// it (None for ids recorded before check values existed), and whether rows sealed with it
/// are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedKey {
    pub id: i32,
    pub check_value: Option<Vec<u8>>,
    pub in_use: bool,
}

/// A one-way digest of a key, stored beside its id so that a different key under the same id
/// (a lost key file regenerated, a typo in crypto.keys) is refused at start instead of making
/// every stored message unreadable.
fn check_value(key: &[u8; KEY_LEN]) -> Vec<u8> {
    let mut hasher = openssl::sha::Sha256::new();
    hasher.update(b"rookery key check 1");
    hasher.update(key);
    hasher.finish().to_vec()
}

/// Where the message keys come from: keys given in configuration (id -> base64) and a key
/// file of "id base64" lines, and when to start warning about a key's use.
#[derive(Debug, Clone, Copy)]
pub struct KeySource<'a> {
    pub configured: &'a BTreeMap<String, Secret>,
    pub key_file: &'a Path,
    pub warn_after_messages: u64,
}

/// The message keys by id. The highest id seals; every id opens.
#[derive(Debug)]
pub struct Keyring {
    keys: BTreeMap<i32, Key>,
    /// Messages sealed per key id (from the database at start, then counted here). Random
    /// 96-bit nonces are safe for at most 2^32 messages per key (NIST SP 800-38D).
    sealed: BTreeMap<i32, AtomicU64>,
    warn_at: u64,
}

/// Once past the warning threshold, warn again every this many messages.
const WARN_EVERY: u64 = 1 << 24;
/// The default threshold: half of the 2^32 bound.
pub const DEFAULT_WARN_AT: u64 = 1 << 31;

/// Parses one configured key: id is a positive integer, key is base64 of exactly 32 bytes.
pub fn parse_key(id: &str, base64: &str) -> Result<(i32, [u8; KEY_LEN]), CryptoError> {
    let bad = |problem: &str| CryptoError::BadKey {
        id: id.to_string(),
        problem: problem.to_string(),
    };
    let key_id: i32 = id
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| bad("the key id must be a positive integer"))?;
    let bytes = STANDARD
        .decode(base64.trim())
        .map_err(|_| bad("the key must be base64"))?;
    let key: [u8; KEY_LEN] = bytes
        .try_into()
        .map_err(|_| bad("the key must decode to exactly 32 bytes"))?;
    Ok((key_id, key))
}

impl Keyring {
    /// A keyring from raw keys; at least one is required.
    pub fn new(keys: impl IntoIterator<Item = (i32, [u8; KEY_LEN])>) -> Option<Keyring> {
        let keys: BTreeMap<i32, Key> = keys.into_iter().map(|(id, k)| (id, Key(k))).collect();
        let sealed = keys.keys().map(|id| (*id, AtomicU64::new(0))).collect();
        (!keys.is_empty()).then_some(Keyring {
            keys,
            sealed,
            warn_at: DEFAULT_WARN_AT,
        })
    }

    /// Warn when a key has sealed this many messages.
    pub fn warn_at(mut self, messages: u64) -> Self {
        self.warn_at = messages.max(1);
        self
    }

    /// Sets the counts of messages already sealed per key (read from the database at start).
    pub fn record_usage(&self, counts: &[(i32, i64)]) {
        for (id, count) in counts {
            if let Some(counter) = self.sealed.get(id) {
                let count = u64::try_from(*count).unwrap_or(0);
                counter.store(count, Ordering::Relaxed);
                if count >= self.warn_at {
                    self.warn_usage(*id, count);
                }
            }
        }
    }

    /// Messages sealed with key `id` so far.
    pub fn usage(&self, id: i32) -> u64 {
        self.sealed
            .get(&id)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    fn warn_usage(&self, id: i32, count: u64) {
        log::warn!(
            "message key {id} has sealed {count} messages; random nonces are safe for at most \
             2^32 per key: run `rookery rotate-key` (or add a key to crypto.keys) and restart"
        );
    }

    fn count_seal(&self, id: i32) {
        if let Some(counter) = self.sealed.get(&id) {
            let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
            if count >= self.warn_at && (count - self.warn_at).is_multiple_of(WARN_EVERY) {
                self.warn_usage(id, count);
            }
        }
    }

    /// Keys from the config and the key file. With neither, generates a development key file
    /// (mode 0600) and warns loudly, unless the database already holds rows sealed with keys
    /// (`recorded`): then the key file was lost, and a new key would open none of them.
    pub fn load(source: &KeySource<'_>, recorded: &[RecordedKey]) -> Result<Keyring, CryptoError> {
        let mut keys = BTreeMap::new();
        for (id, key) in source.configured {
            let (id, key) = parse_key(id, key.expose())?;
            keys.insert(id, key);
        }
        let path = source.key_file;
        if path.exists() {
            warn_if_readable_by_others(path, "message key file");
            for (id, key) in read_key_file(path)? {
                if keys.get(&id).is_some_and(|k| *k != key) {
                    return Err(CryptoError::BadKey {
                        id: id.to_string(),
                        problem: format!("differs between the config and {}", path.display()),
                    });
                }
                keys.insert(id, key);
            }
        } else if keys.is_empty() {
            let sealed: Vec<i32> = recorded.iter().filter(|k| k.in_use).map(|k| k.id).collect();
            if !sealed.is_empty() {
                return Err(CryptoError::MissingKeys {
                    ids: sealed,
                    file: path.display().to_string(),
                });
            }
            let key = generate_key_file(path)?;
            log::warn!(
                "NO MESSAGE KEY CONFIGURED: generated a development key in {}. Anyone with this \
                 file can read every stored message; configure crypto.keys for production.",
                path.display()
            );
            keys.insert(1, key);
        }
        let ring = Keyring::new(keys)
            .ok_or_else(|| CryptoError::BadKey {
                id: "-".into(),
                problem: "no message key".into(),
            })?
            .warn_at(source.warn_after_messages);
        log::info!(
            "message keys loaded: ids {:?}, sealing with {}",
            ring.ids(),
            ring.current()
        );
        Ok(ring)
    }

    /// Checks the keys against what the database recorded: a key whose check value differs
    /// from the recorded one, or a recorded key id with stored rows that no key here has, stops
    /// the start. Returns the (id, check value) pairs to record: keys new to the database and
    /// ids recorded before check values existed.
    pub fn verify(&self, recorded: &[RecordedKey]) -> Result<Vec<(i32, Vec<u8>)>, CryptoError> {
        let missing: Vec<i32> = recorded
            .iter()
            .filter(|r| r.in_use && !self.keys.contains_key(&r.id))
            .map(|r| r.id)
            .collect();
        if !missing.is_empty() {
            return Err(CryptoError::MissingKeys {
                ids: missing,
                file: "crypto.keys or the key file".into(),
            });
        }
        let mut to_record = Vec::new();
        for (id, key) in &self.keys {
            let check = check_value(&key.0);
            match recorded.iter().find(|r| r.id == *id) {
                Some(RecordedKey {
                    check_value: Some(stored),
                    ..
                }) if *stored != check => return Err(CryptoError::WrongKey(*id)),
                Some(RecordedKey {
                    check_value: Some(_),
                    ..
                }) => {}
                _ => to_record.push((*id, check)),
            }
        }
        Ok(to_record)
    }

    pub fn ids(&self) -> Vec<i32> {
        self.keys.keys().copied().collect()
    }

    /// The id new messages are sealed with.
    pub fn current(&self) -> i32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    pub fn seal(&self, at: &Binding, body: &[u8]) -> Result<Sealed, CryptoError> {
        let key_id = self.current();
        let key = self
            .keys
            .get(&key_id)
            .ok_or(CryptoError::UnknownKey(key_id))?;
        let mut nonce = vec![0u8; NONCE_LEN];
        openssl::rand::rand_bytes(&mut nonce)?;
        let mut tag = [0u8; TAG_LEN];
        let mut ciphertext = encrypt_aead(
            Cipher::aes_256_gcm(),
            &key.0,
            Some(&nonce),
            &at.aad(AAD_BOUND)?,
            body,
            &mut tag,
        )?;
        ciphertext.extend_from_slice(&tag);
        self.count_seal(key_id);
        Ok(Sealed {
            key_id,
            aad_version: AAD_BOUND,
            nonce,
            ciphertext,
        })
    }

    pub fn open(&self, at: &Binding, sealed: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let key = self
            .keys
            .get(&sealed.key_id)
            .ok_or(CryptoError::UnknownKey(sealed.key_id))?;
        if sealed.nonce.len() != NONCE_LEN || sealed.ciphertext.len() < TAG_LEN {
            return Err(CryptoError::Authentication);
        }
        let (data, tag) = sealed
            .ciphertext
            .split_at(sealed.ciphertext.len() - TAG_LEN);
        decrypt_aead(
            Cipher::aes_256_gcm(),
            &key.0,
            Some(&sealed.nonce),
            &at.aad(sealed.aad_version)?,
            data,
            tag,
        )
        .map_err(|_| CryptoError::Authentication)
    }
}

fn key_file_error(path: &Path, source: std::io::Error) -> CryptoError {
    CryptoError::KeyFile {
        path: path.display().to_string(),
        source,
    }
}

/// Lines of "id base64"; blank lines and lines starting with '#' are skipped.
fn read_key_file(path: &Path) -> Result<Vec<(i32, [u8; KEY_LEN])>, CryptoError> {
    let text = std::fs::read_to_string(path).map_err(|e| key_file_error(path, e))?;
    text.lines()
        .enumerate()
        .map(|(n, line)| (n, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| {
            let (id, key) =
                line.split_once(char::is_whitespace)
                    .ok_or_else(|| CryptoError::BadKey {
                        id: format!("{}:{}", path.display(), n + 1),
                        problem: "expected \"<id> <base64 key>\"".into(),
                    })?;
            parse_key(id, key)
        })
        .collect()
}

/// `rookery rotate-key`: appends a new random key, with the next id, to the key file (created
/// with mode 0600 if missing). New messages are sealed with it once the server restarts; old
/// rows keep opening with their own key ids.
pub fn add_key(source: &KeySource<'_>) -> Result<(i32, PathBuf), CryptoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = source.key_file.to_path_buf();
    let mut highest = 0;
    for (id, key) in source.configured {
        highest = highest.max(parse_key(id, key.expose())?.0);
    }
    if path.exists() {
        for (id, _) in read_key_file(&path)? {
            highest = highest.max(id);
        }
    }
    let id = highest.checked_add(1).ok_or_else(|| CryptoError::BadKey {
        id: highest.to_string(),
        problem: "no key id is left above it".into(),
    })?;
    let mut key = [0u8; KEY_LEN];
    openssl::rand::rand_bytes(&mut key)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| key_file_error(&path, e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| key_file_error(&path, e))?;
    writeln!(file, "{id} {}", STANDARD.encode(key)).map_err(|e| key_file_error(&path, e))?;
    Ok((id, path))
}

/// Warns when a file holding a secret key may be read by anyone but its owner.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    if let Some(mode) = mode_wider_than_owner(path) {
        log::warn!(
            "{what} {} has mode {mode:04o}: anyone in its group or on the machine may read it; \
             chmod 600 it",
            path.display()
        );
    }
}

/// The file's permission bits when they grant anything to group or others.
fn mode_wider_than_owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

fn generate_key_file(path: &Path) -> Result<[u8; KEY_LEN], CryptoError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; KEY_LEN];
    openssl::rand::rand_bytes(&mut key)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| key_file_error(path, e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_file_error(path, e))?;
    writeln!(
        file,
        "# Rookery message keys: \"<id> <base64 of 32 bytes>\". Generated for development.\n1 {}",
        STANDARD.encode(key)
    )
    .map_err(|e| key_file_error(path, e))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[i32]) -> Keyring {
        Keyring::new(ids.iter().map(|id| (*id, [*id as u8; 32]))).unwrap()
    }

    fn at(room: i64, seq: i64) -> Binding {
        Binding {
            room: RoomId(room),
            seq: Seq(seq),
            sender: UserId(7),
            sent_at_micros: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn seal_then_open() {
        let keys = ring(&[1]);
        let sealed = keys.seal(&at(3, 9), b"hello").unwrap();
        assert_eq!(sealed.key_id, 1);
        assert_eq!(sealed.nonce.len(), 12);
        assert!(!sealed.ciphertext.windows(5).any(|w| w == b"hello"));
        assert_eq!(keys.open(&at(3, 9), &sealed).unwrap(), b"hello");
    }

    #[test]
    fn nonces_differ() {
        let keys = ring(&[1]);
        let a = keys.seal(&at(1, 1), b"x").unwrap();
        let b = keys.seal(&at(1, 1), b"x").unwrap();
        assert_ne!(a.nonce, b.nonce);
    }

    #[test]
    fn bound_to_room_and_seq() {
        let keys = ring(&[1]);
        let sealed = keys.seal(&at(3, 9), b"hello").unwrap();
        assert!(matches!(
            keys.open(&at(4, 9), &sealed),
            Err(CryptoError::Authentication)
        ));
        assert!(matches!(
            keys.open(&at(3, 8), &sealed),
            Err(CryptoError::Authentication)
        ));
    }

    #[test]
    fn bound_to_sender_and_time() {
        let keys = ring(&[1]);
        let sealed = keys.seal(&at(3, 9), b"hello").unwrap();
        let other_sender = Binding {
            sender: UserId(8),
            ..at(3, 9)
        };
        let other_time = Binding {
            sent_at_micros: at(3, 9).sent_at_micros + 1,
            ..at(3, 9)
        };
        for moved in [other_sender, other_time] {
            assert!(matches!(
                keys.open(&moved, &sealed),
                Err(CryptoError::Authentication)
            ));
        }
        let downgraded = Sealed {
            aad_version: AAD_ROOM_SEQ,
            ..sealed.clone()
        };
        assert!(keys.open(&at(3, 9), &downgraded).is_err());
    }

    #[test]
    fn rows_sealed_with_room_and_seq_only_still_open() {
        let keys = ring(&[1]);
        let key = [1u8; 32];
        let nonce = [5u8; 12];
        let mut tag = [0u8; TAG_LEN];
        let aad = at(3, 9).aad(AAD_ROOM_SEQ).unwrap();
        assert_eq!(&aad[..8], b"rookery1");
        let mut ciphertext = encrypt_aead(
            Cipher::aes_256_gcm(),
            &key,
            Some(&nonce),
            &aad,
            b"old",
            &mut tag,
        )
        .unwrap();
        ciphertext.extend_from_slice(&tag);
        let old = Sealed {
            key_id: 1,
            aad_version: AAD_ROOM_SEQ,
            nonce: nonce.to_vec(),
            ciphertext,
        };
        assert_eq!(keys.open(&at(3, 9), &old).unwrap(), b"old");
        let unknown = Sealed {
            aad_version: 9,
            ..old
        };
        assert!(matches!(
            keys.open(&at(3, 9), &unknown),
            Err(CryptoError::UnknownFormat(9))
        ));
    }

    #[test]
    fn a_key_that_differs_from_the_recorded_one_is_refused() {
        let keys = ring(&[1, 2]);
        let recorded = keys.verify(&[]).unwrap();
        assert_eq!(recorded.len(), 2);
        let as_stored = |id: i32, check: Option<Vec<u8>>, in_use: bool| RecordedKey {
            id,
            check_value: check,
            in_use,
        };
        let good: Vec<RecordedKey> = recorded
            .iter()
            .map(|(id, check)| as_stored(*id, Some(check.clone()), true))
            .collect();
        assert_eq!(keys.verify(&good).unwrap(), vec![]);
        // Recorded before check values existed: adopted.
        let legacy = [as_stored(1, None, true)];
        assert_eq!(keys.verify(&legacy).unwrap().len(), 2);
        // Another key under id 1.
        let other = ring(&[1]).verify(&[]).unwrap();
        let mut wrong = good.clone();
        wrong[0].check_value = Some(vec![0; 32]);
        assert!(matches!(keys.verify(&wrong), Err(CryptoError::WrongKey(1))));
        assert_ne!(other[0].1, vec![0; 32]);
        // A key with stored rows that this keyring lacks.
        let only_two = ring(&[2]);
        assert!(matches!(
            only_two.verify(&good),
            Err(CryptoError::MissingKeys { ids, .. }) if ids == vec![1]
        ));
        // A recorded id without rows may be gone.
        let unused = [as_stored(1, Some(recorded[0].1.clone()), false)];
        assert!(only_two.verify(&unused).is_ok());
    }

    #[test]
    fn a_lost_key_file_is_not_replaced_while_rows_need_it() {
        let dir = std::env::temp_dir().join(format!("rookery-lost-{}", uuid::Uuid::new_v4()));
        let (none, file) = (BTreeMap::new(), dir.join("message-keys"));
        let config = source(&none, &file);
        let recorded = [RecordedKey {
            id: 1,
            check_value: Some(vec![1; 32]),
            in_use: true,
        }];
        let refused = Keyring::load(&config, &recorded).unwrap_err().to_string();
        assert!(
            refused.contains("message-keys") && refused.contains("[1]"),
            "{refused}"
        );
        assert!(!file.exists(), "no new key was written");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn key_files_readable_by_others_are_found() {
        use std::os::unix::fs::PermissionsExt;
        let file = std::env::temp_dir().join(format!("rookery-mode-{}", uuid::Uuid::new_v4()));
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(mode_wider_than_owner(&file), Some(0o644));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(mode_wider_than_owner(&file), None);
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn tampering_is_detected() {
        let keys = ring(&[1]);
        let mut sealed = keys.seal(&at(3, 9), b"hello").unwrap();
        sealed.ciphertext[0] ^= 1;
        assert!(matches!(
            keys.open(&at(3, 9), &sealed),
            Err(CryptoError::Authentication)
        ));
        sealed.ciphertext.truncate(3);
        assert!(keys.open(&at(3, 9), &sealed).is_err());
    }

    #[test]
    fn rotation_keeps_old_rows_readable() {
        let old = ring(&[1]);
        let sealed = old.seal(&at(1, 1), b"old").unwrap();
        let rotated = ring(&[1, 2]);
        assert_eq!(rotated.current(), 2);
        assert_eq!(rotated.open(&at(1, 1), &sealed).unwrap(), b"old");
        assert_eq!(rotated.seal(&at(1, 2), b"new").unwrap().key_id, 2);
        let without = ring(&[2]);
        assert!(matches!(
            without.open(&at(1, 1), &sealed),
            Err(CryptoError::UnknownKey(1))
        ));
    }

    #[test]
    fn usage_is_counted_per_key() {
        let keys = ring(&[1, 2]).warn_at(3);
        keys.record_usage(&[(1, 10)]);
        for _ in 0..5 {
            keys.seal(&at(1, 1), b"x").unwrap();
        }
        assert_eq!((keys.usage(1), keys.usage(2)), (10, 5));
    }

    /// Keys from a key file in `dir` only, as with the default configuration.
    fn source<'a>(none: &'a BTreeMap<String, Secret>, file: &'a Path) -> KeySource<'a> {
        KeySource {
            configured: none,
            key_file: file,
            warn_after_messages: DEFAULT_WARN_AT,
        }
    }

    #[test]
    fn rotation_appends_the_next_key() {
        let dir = std::env::temp_dir().join(format!("rookery-rotate-{}", uuid::Uuid::new_v4()));
        let (none, file) = (BTreeMap::new(), dir.join("message-keys"));
        let config = source(&none, &file);
        let first = Keyring::load(&config, &[]).unwrap();
        let sealed = first.seal(&at(1, 1), b"old").unwrap();
        assert_eq!(add_key(&config).unwrap().0, 2);
        assert_eq!(add_key(&config).unwrap().0, 3);
        let rotated = Keyring::load(&config, &[]).unwrap();
        assert_eq!(rotated.current(), 3);
        assert_eq!(rotated.open(&at(1, 1), &sealed).unwrap(), b"old");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn key_parsing() {
        assert!(parse_key("1", &STANDARD.encode([0u8; 32])).is_ok());
        assert!(parse_key("0", &STANDARD.encode([0u8; 32])).is_err());
        assert!(parse_key("x", &STANDARD.encode([0u8; 32])).is_err());
        assert!(parse_key("1", &STANDARD.encode([0u8; 31])).is_err());
        assert!(parse_key("1", "not base64!").is_err());
    }

    #[test]
    fn generated_key_file_is_private_and_reloads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rookery-keys-{}", uuid::Uuid::new_v4()));
        let (none, file) = (BTreeMap::new(), dir.join("message-keys"));
        let config = source(&none, &file);
        let first = Keyring::load(&config, &[]).unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = first.seal(&at(1, 1), b"x").unwrap();
        let second = Keyring::load(&config, &[]).unwrap();
        assert_eq!(second.open(&at(1, 1), &sealed).unwrap(), b"x");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
