//! Checking a restored backup against its `backup_manifest` from what the unpack saw.
//!
//! `pg_verifybackup -n` reads every file of a restored data directory a second time to
//! compare it with the manifest. The unpacker ([`super::untar`]) has already passed every
//! byte through its writers, which keep each file's size and CRC-32C (the manifest's
//! default checksum, and the one pgherd's own manifests use), so a restore compares those
//! instead, by the rules `pg_verifybackup` applies to the files (its parser is stricter
//! about the manifest's other keys, which the files' check does not need):
//! - the manifest's own checksum holds: SHA-256 of every byte up to and including the
//!   newline before its last line;
//! - its version is 1 or 2, and a version 2 manifest's system identifier is the restored
//!   `pg_control`'s;
//! - every file it lists was unpacked, with its size and checksum, and no file was unpacked
//!   that it does not list;
//! - the paths `pg_verifybackup` ignores are ignored on both sides (`backup_manifest`,
//!   `pg_wal`, `postgresql.auto.conf`, `recovery.signal`, `standby.signal`).
//!
//! A manifest with another checksum algorithm (`pg_basebackup --manifest-checksums`) or a
//! version this module does not know is left to `pg_verifybackup`; so is `pgherdctl backup
//! verify`, which wants a second opinion from PostgreSQL's own tool.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use super::untar::FileSum;

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
    #[serde(rename = "System-Identifier")]
    system_identifier: Option<u64>,
    #[serde(rename = "Files")]
    files: Vec<Entry>,
    #[serde(rename = "Manifest-Checksum")]
    checksum: String,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Path")]
    path: Option<String>,
    /// A path that is not UTF-8, hex-encoded.
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

/// What [`check`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Every file listed was unpacked as listed; `files` were compared.
    Matches { files: usize },
    /// This module cannot check the manifest (`why`); `pg_verifybackup` must.
    Unsupported { why: String },
}

/// Paths `pg_verifybackup` does not check, with everything below them.
const IGNORED: [&str; 5] = [
    "backup_manifest",
    "pg_wal",
    "postgresql.auto.conf",
    "recovery.signal",
    "standby.signal",
];

fn ignored(path: &Path) -> bool {
    IGNORED.iter().any(|i| path.starts_with(i))
}

/// At most this many differences are named in the error.
const SHOWN: usize = 10;

/// Checks manifest `text` against the files an unpack wrote (`unpacked`, with the paths they
/// have in the data directory). `system_identifier` reads the restored `pg_control`'s, asked
/// only for a version 2 manifest. An error names every difference (up to [`SHOWN`]).
pub fn check(
    text: &[u8],
    unpacked: &[FileSum],
    system_identifier: impl FnOnce() -> Result<u64>,
) -> Result<Checked> {
    let manifest: Manifest =
        serde_json::from_slice(text).context("backup_manifest is not a valid manifest")?;
    check_own_checksum(text, &manifest.checksum)?;
    if !(1..=2).contains(&manifest.version) {
        return Ok(Checked::Unsupported {
            why: format!("its version is {}", manifest.version),
        });
    }
    if manifest.version >= 2 {
        let listed = manifest
            .system_identifier
            .ok_or_else(|| anyhow!("backup_manifest (version 2) has no System-Identifier"))?;
        let restored = system_identifier()?;
        if listed != restored {
            bail!(
                "backup_manifest is for system identifier {listed}, the restored pg_control is of system {restored}"
            );
        }
    }
    let mut listed = BTreeMap::new();
    for e in &manifest.files {
        let path = entry_path(e)?;
        match e.algorithm.as_deref() {
            Some(a) if a.eq_ignore_ascii_case("CRC32C") => {}
            other => {
                return Ok(Checked::Unsupported {
                    why: format!(
                        "it lists {} with checksum algorithm {}",
                        path.display(),
                        other.unwrap_or("none")
                    ),
                })
            }
        }
        if listed.insert(path.clone(), e).is_some() {
            bail!("backup_manifest lists {} twice", path.display());
        }
    }
    let mut wrong = Vec::new();
    let mut compared = 0;
    let mut seen = std::collections::BTreeSet::new();
    for f in unpacked.iter().filter(|f| !ignored(&f.path)) {
        seen.insert(f.path.as_path());
        let Some(e) = listed.get(&f.path) else {
            wrong.push(format!(
                "{} is in the backup but not in its manifest",
                f.path.display()
            ));
            continue;
        };
        if e.size != f.size {
            wrong.push(format!(
                "{} has {} bytes, its manifest says {}",
                f.path.display(),
                f.size,
                e.size
            ));
            continue;
        }
        let got = hex::encode(f.crc32c.to_ne_bytes());
        let want = e.checksum.as_deref().unwrap_or_default();
        if !got.eq_ignore_ascii_case(want) {
            wrong.push(format!(
                "{} has checksum {got}, its manifest says {want:?}",
                f.path.display()
            ));
            continue;
        }
        compared += 1;
    }
    for path in listed.keys().filter(|p| !ignored(p)) {
        if !seen.contains(path.as_path()) {
            wrong.push(format!(
                "{} is in the manifest but not in the backup",
                path.display()
            ));
        }
    }
    if !wrong.is_empty() {
        let more = wrong.len().saturating_sub(SHOWN);
        wrong.truncate(SHOWN);
        let mut msg = wrong.join("; ");
        if more > 0 {
            msg.push_str(&format!("; and {more} more"));
        }
        bail!("the backup does not match its manifest: {msg}");
    }
    Ok(Checked::Matches { files: compared })
}

fn entry_path(e: &Entry) -> Result<PathBuf> {
    match (&e.path, &e.encoded_path) {
        (Some(p), _) => Ok(PathBuf::from(p)),
        (None, Some(hex_path)) => {
            let bytes = hex::decode(hex_path)
                .with_context(|| format!("backup_manifest has a bad Encoded-Path {hex_path:?}"))?;
            Ok(PathBuf::from(OsStr::from_bytes(&bytes)))
        }
        (None, None) => bail!("backup_manifest has a file with neither Path nor Encoded-Path"),
    }
}

/// The manifest's own checksum: SHA-256 of every byte up to and including the second last
/// newline (the one before the `Manifest-Checksum` line), as `pg_verifybackup` computes it.
fn check_own_checksum(text: &[u8], claimed: &str) -> Result<()> {
    let last = text.iter().rposition(|&b| b == b'\n');
    if last != text.len().checked_sub(1) {
        bail!("backup_manifest's last line does not end with a newline");
    }
    let before = last.and_then(|l| text[..l].iter().rposition(|&b| b == b'\n'));
    let Some(end) = before else {
        bail!("backup_manifest has fewer than two lines");
    };
    let sum = super::compress::sha256_hex(&text[..=end]);
    if !sum.eq_ignore_ascii_case(claimed) {
        bail!("backup_manifest's own checksum does not hold: its content has SHA-256 {sum}, it says {claimed}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::files::FileEntry;

    fn entry(path: &str, body: &[u8]) -> FileEntry {
        FileEntry {
            path: path.to_string(),
            size: body.len() as u64,
            sha256: String::new(),
            mtime: Some(1_700_000_000),
            crc32c: Some(crc32c::crc32c(body)),
            from: None,
        }
    }

    fn sum(path: &str, body: &[u8]) -> FileSum {
        FileSum {
            path: path.into(),
            size: body.len() as u64,
            crc32c: crc32c::crc32c(body),
        }
    }

    const FILES: [(&str, &[u8]); 4] = [
        ("global/pg_control", b"control"),
        ("base/1/1259", b"pg_class"),
        ("postgresql.auto.conf", b"# auto"),
        ("backup_label", b"START WAL LOCATION"),
    ];

    fn manifest(major: u32) -> String {
        let listed: Vec<FileEntry> = FILES.iter().map(|(p, b)| entry(p, b)).collect();
        crate::backup::copy::manifest(
            major,
            7,
            &listed,
            1,
            "0/2000028".parse().unwrap(),
            "0/2000100".parse().unwrap(),
        )
    }

    fn unpacked() -> Vec<FileSum> {
        FILES.iter().map(|(p, b)| sum(p, b)).collect()
    }

    fn err(text: &str, files: &[FileSum]) -> String {
        format!("{:#}", check(text.as_bytes(), files, || Ok(7)).unwrap_err())
    }

    #[test]
    fn a_backup_unpacked_as_listed_matches_both_versions() {
        for major in [15, 17] {
            assert_eq!(
                check(manifest(major).as_bytes(), &unpacked(), || Ok(7)).unwrap(),
                // postgresql.auto.conf is ignored, as pg_verifybackup ignores it.
                Checked::Matches { files: 3 },
                "PostgreSQL {major}"
            );
        }
    }

    #[test]
    fn a_changed_removed_or_added_file_is_named() {
        let text = manifest(15);
        let mut changed = unpacked();
        changed[1] = sum("base/1/1259", b"pg_clasz");
        assert_eq!(
            err(&text, &changed),
            format!(
                "the backup does not match its manifest: base/1/1259 has checksum {}, its manifest says {:?}",
                hex::encode(crc32c::crc32c(b"pg_clasz").to_ne_bytes()),
                hex::encode(crc32c::crc32c(b"pg_class").to_ne_bytes())
            )
        );
        let mut cut = unpacked();
        cut[1] = sum("base/1/1259", b"pg_cl");
        assert!(err(&text, &cut).contains("base/1/1259 has 5 bytes, its manifest says 8"));
        let mut removed = unpacked();
        removed.remove(1);
        assert!(
            err(&text, &removed).contains("base/1/1259 is in the manifest but not in the backup")
        );
        let mut added = unpacked();
        added.push(sum("base/1/99999", b"planted"));
        assert!(
            err(&text, &added).contains("base/1/99999 is in the backup but not in its manifest")
        );
        // What pg_verifybackup ignores may be there or not.
        let mut ignored = unpacked();
        ignored.retain(|f| f.path != Path::new("postgresql.auto.conf"));
        ignored.push(sum("pg_wal/000000010000000000000002", b"wal"));
        ignored.push(sum("recovery.signal", b""));
        assert_eq!(
            check(text.as_bytes(), &ignored, || Ok(7)).unwrap(),
            Checked::Matches { files: 3 }
        );
    }

    #[test]
    fn a_manifest_whose_own_checksum_does_not_hold_is_refused() {
        // A size changed in the manifest, so that it matches a file cut short.
        let text = manifest(15).replace("\"Size\": 8,", "\"Size\": 5,");
        assert_ne!(text, manifest(15));
        let mut cut = unpacked();
        cut[1] = sum("base/1/1259", b"pg_cl");
        assert!(err(&text, &cut).contains("backup_manifest's own checksum does not hold"));
        assert!(err("{}", &unpacked()).contains("not a valid manifest"));
        let one_line = format!("{}\n", manifest(15).replace('\n', " "));
        assert!(err(&one_line, &unpacked()).contains("fewer than two lines"));
        let unterminated = manifest(15).trim_end().to_string();
        assert!(err(&unterminated, &unpacked()).contains("does not end with a newline"));
    }

    #[test]
    fn a_version_2_manifest_of_another_system_is_refused() {
        let e = format!(
            "{:#}",
            check(manifest(17).as_bytes(), &unpacked(), || Ok(8)).unwrap_err()
        );
        assert!(e.contains("system identifier 7"), "{e}");
    }

    #[test]
    fn other_checksum_algorithms_are_left_to_pg_verifybackup() {
        let mut listed: Vec<FileEntry> = FILES.iter().map(|(p, b)| entry(p, b)).collect();
        listed[0].crc32c = None;
        let text = crate::backup::copy::manifest(
            15,
            7,
            &listed,
            1,
            "0/2000028".parse().unwrap(),
            "0/2000100".parse().unwrap(),
        );
        assert!(matches!(
            check(text.as_bytes(), &unpacked(), || Ok(7)).unwrap(),
            Checked::Unsupported { why } if why.contains("global/pg_control") && why.contains("none")
        ));
    }

    #[test]
    fn a_path_that_is_not_utf8_is_compared_by_its_bytes() {
        let text = manifest(15).replacen(
            "\"Path\": \"base/1/1259\"",
            &format!("\"Encoded-Path\": \"{}\"", hex::encode(b"base/1/\xff")),
            1,
        );
        // The edit breaks the manifest's own checksum: write it again.
        let body = &text[..text.find("\"Manifest-Checksum\"").unwrap()];
        let text = format!(
            "{body}\"Manifest-Checksum\": \"{}\"}}\n",
            crate::backup::compress::sha256_hex(body.as_bytes())
        );
        let mut files = unpacked();
        files[1] = FileSum {
            path: PathBuf::from(OsStr::from_bytes(b"base/1/\xff")),
            size: 8,
            crc32c: crc32c::crc32c(b"pg_class"),
        };
        assert_eq!(
            check(text.as_bytes(), &files, || Ok(7)).unwrap(),
            Checked::Matches { files: 3 }
        );
    }
}
