//! What a directory tree looks like on disk, to prove that nothing touched it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The facts of one file that any write, chmod, chown or replacement changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub inode: u64,
    pub len: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
}

/// Every file and directory under `root` (relative paths, `root` itself as ""), with facts.
pub fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, FileFacts>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                stack.push(entry?.path());
            }
        }
        let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        out.insert(
            relative,
            FileFacts {
                inode: meta.ino(),
                len: meta.len(),
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
            },
        );
    }
    Ok(out)
}

/// The differences between two snapshots, one line each; empty if they are the same.
pub fn snapshot_diff(
    before: &BTreeMap<PathBuf, FileFacts>,
    after: &BTreeMap<PathBuf, FileFacts>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, facts) in before {
        match after.get(path) {
            None => out.push(format!("removed: {}", path.display())),
            Some(now) if now != facts => {
                out.push(format!("changed: {} {facts:?} -> {now:?}", path.display()))
            }
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        out.push(format!("added: {}", path.display()));
    }
    out
}
