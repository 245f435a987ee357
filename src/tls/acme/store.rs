//! ACME's files: issued certificates in the credentials layout Portico already reads
//! (`<name>/tls.crt`, `<name>/tls.key`), and under `.acme/` the accounts, the lock that
//! lets one replica order at a time, and the challenge answers replicas share. Every file
//! is written atomically (a temporary file, fsync, rename, fsync of the folder); private
//! keys and account keys are created mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;

/// `.acme/http-01/<token>`: the key authorization, for replicas that did not order.
pub fn http01_path(state_dir: &Path, token: &str) -> PathBuf {
    state_dir.join("http-01").join(token)
}

/// `.acme/tls-alpn-01/<host>.pem`: the validation certificate and its key.
pub fn tls_alpn01_path(state_dir: &Path, host: &str) -> PathBuf {
    state_dir.join("tls-alpn-01").join(format!("{host}.pem"))
}

/// `.acme/accounts/<hash>.json`: one account per ACME directory URL.
pub fn account_path(state_dir: &Path, directory: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    state_dir.join("accounts").join(format!("{hex}.json"))
}

/// Writes `data` to `path` atomically: `path`'s folder gets a temporary file that is
/// written, flushed to disk and renamed over `path`, then the folder is flushed, so a
/// reader (this process's reload, another replica, a restart after a crash) sees the old
/// file or the new one, never part of one. `private`: mode 0600 (else 0644).
pub fn write_atomic(path: &Path, data: &[u8], private: bool) -> Result<(), String> {
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no folder", path.display()))?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, path)
            .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir);
    Ok(())
}

/// A temporary name beside `path` that no other writer uses and no glob of Portico's
/// (`*.toml`, `tls.crt`) matches.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A newly issued pair, written so that no reader sees the new key with the old
/// certificate for longer than the moment between two renames: both temporary files are
/// complete and on disk before either is renamed, the key first.
pub fn write_pair(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(), String> {
    let mut staged = Vec::new();
    for (path, data, private) in [(key_path, key_pem, true), (cert_path, cert_pem, false)] {
        let dir = path
            .parent()
            .ok_or_else(|| format!("{} has no folder", path.display()))?;
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = temp_path(path);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if private { 0o600 } else { 0o644 })
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            for (t, _) in &staged {
                let _ = fs::remove_file(t);
            }
            return Err(format!("cannot write {}: {e}", tmp.display()));
        }
        staged.push((tmp, path.to_path_buf()));
    }
    for (tmp, path) in &staged {
        fs::rename(tmp, path)
            .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))?;
    }
    for (_, path) in &staged {
        if let Some(dir) = path.parent() {
            sync_dir(dir);
        }
    }
    Ok(())
}

pub fn read_account(path: &Path) -> Result<Option<AccountCredentials>, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("cannot read ACME account {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read ACME account {}: {e}", path.display())),
    }
}

pub fn write_account(path: &Path, creds: &AccountCredentials) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(creds)
        .map_err(|e| format!("cannot encode the ACME account: {e}"))?;
    write_atomic(path, &json, true)
}

/// The lock that lets one replica order at a time: an exclusive `flock` on `.acme/lock`,
/// held until dropped (and released by the kernel if the process dies).
pub struct OrderLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Takes the lock if no one holds it; `Ok(None)` when another process does.
pub fn try_lock(state_dir: &Path) -> Result<Option<OrderLock>, String> {
    fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    let path = state_dir.join("lock");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(OrderLock { _lock: lock })),
        Err((_, nix::errno::Errno::EAGAIN)) => Ok(None),
        Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// What the manager needs to know about a certificate on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCert {
    pub not_before: i64,
    pub not_after: i64,
    /// DNS names of the leaf's subjectAltName, lower-case.
    pub names: Vec<String>,
    pub modified: Option<std::time::SystemTime>,
}

/// The leaf of the PEM chain at `path`; `None` when the file is missing or unreadable.
pub fn read_cert(path: &Path) -> Option<DiskCert> {
    use rustls_pki_types::pem::PemObject;
    let modified = fs::metadata(path).and_then(|m| m.modified()).ok();
    let pem = fs::read(path).ok()?;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(DiskCert {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        names,
        modified,
    })
}

/// The modification time of `path`, to see whether it changed since it was read.
pub fn modified(path: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_set_modes_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("shop/tls.key");
        let crt = dir.path().join("shop/tls.crt");
        write_pair(&crt, &key, b"cert", b"key").unwrap();
        write_pair(&crt, &key, b"cert2", b"key2").unwrap();
        assert_eq!(fs::read(&crt).unwrap(), b"cert2");
        assert_eq!(fs::read(&key).unwrap(), b"key2");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&crt), 0o644);
        let names: Vec<_> = fs::read_dir(dir.path().join("shop"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let acct = dir.path().join(".acme/accounts/x.json");
        write_atomic(&acct, b"{}", true).unwrap();
        assert_eq!(mode(&acct), 0o600);
    }

    #[test]
    fn one_holder_of_the_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(try_lock(dir.path()).unwrap().is_none(), "held");
        drop(first);
        assert!(try_lock(dir.path()).unwrap().is_some(), "released");
    }

    #[test]
    fn reads_the_leaf_of_a_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        crate::tls::generate_self_signed(&c, &k, &["a.test".into(), "B.test".into()]).unwrap();
        let d = read_cert(&c).unwrap();
        assert_eq!(d.names, vec!["a.test", "b.test"]);
        assert!(d.not_after > d.not_before);
        assert!(read_cert(&dir.path().join("missing")).is_none());
    }
}
