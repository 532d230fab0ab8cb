//! Resolving a configured path to an open directory, one component at a time: a symlink
//! on the way is followed only where the directory holding it can be written by root (or
//! the agent's own user) alone.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode};

use super::{context, dir_flags, mode, open_dir_fd, refused, trusted_uid, Dir, Meta};

/// Symlinks followed while resolving one path, as the kernel's own limit.
const MAX_SYMLINKS: usize = 40;

/// Whether a symlink in a directory with `dir`'s metadata can only have been made by root or
/// by the agent's own user.
fn may_follow(dir: &Meta, link: &Meta) -> bool {
    if !dir.writable_by_others() {
        return true;
    }
    // A sticky directory (/tmp): others may add entries but not replace or rename those of
    // root or ours, so a link root or we made is still ours.
    trusted_uid(dir.uid) && dir.mode & 0o1000 != 0 && trusted_uid(link.uid)
}

/// Opens the directory holding `path` (as [`Dir::open`]) and returns it with the last
/// component's name.
pub fn split(path: &Path) -> io::Result<(Dir, OsString)> {
    let (parent, name) = parent_and_name(path)?;
    Ok((Dir::open(parent)?, name))
}

/// [`split`], creating the missing parent directories with `mode`.
pub fn split_create(path: &Path, mode: u32) -> io::Result<(Dir, OsString)> {
    let (parent, name) = parent_and_name(path)?;
    Ok((Dir::create_all(parent, mode)?, name))
}

fn parent_and_name(path: &Path) -> io::Result<(&Path, OsString)> {
    let name = match path.components().next_back() {
        Some(Component::Normal(n)) => n.to_os_string(),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} does not end in a file name", path.display()),
            ))
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, name))
}

/// `path`'s components still to walk: names and `..` (`/` and `.` say nothing more).
fn walk_components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

pub(super) fn resolve(path: &Path, create: Option<u32>) -> io::Result<Dir> {
    let root = || {
        let start = if path.is_absolute() { "/" } else { "." };
        rfs::openat(rfs::CWD, start, dir_flags(), Mode::empty())
            .map_err(|e| context(e.into(), start))
    };
    let mut cur = root()?;
    // The path walked so far, for messages.
    let mut shown = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        PathBuf::new()
    };
    let mut todo = walk_components(path);
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            cur = open_dir_fd(&cur, OsStr::new(".."))?;
            shown.pop();
            continue;
        }
        let here = shown.join(&name);
        match open_dir_fd(&cur, &name) {
            Ok(fd) => {
                cur = fd;
                shown = here;
            }
            Err(rustix::io::Errno::NOENT) if create.is_some() => {
                let m = create.unwrap_or(0o700);
                match rfs::mkdirat(&cur, &name, mode(m)) {
                    Ok(()) => {
                        let fd = open_dir_fd(&cur, &name)
                            .map_err(|e| context(e.into(), here.display()))?;
                        let dir = Dir {
                            fd,
                            path: here.clone(),
                        };
                        dir.check_made_by_us()?;
                        dir.chmod(m)?;
                        cur = dir.fd;
                        shown = here;
                    }
                    // Made meanwhile by someone else: walk into it as any existing entry.
                    Err(rustix::io::Errno::EXIST) => todo.push_front(name),
                    Err(e) => return Err(context(e.into(), here.display())),
                }
            }
            Err(e @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) => {
                let link = match rfs::statat(&cur, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => Meta::from(&st),
                    Err(e) => return Err(context(e.into(), here.display())),
                };
                if link.kind != FileType::Symlink {
                    return Err(context(e.into(), here.display()));
                }
                let dir = Meta::from(&rfs::fstat(&cur)?);
                if !may_follow(&dir, &link) {
                    return Err(refused(format!(
                        "{} is a symlink in {}, a directory that uid {} (or its group or others) can write, so it may have been planted; pgherd does not follow it: name the real directory in the configuration",
                        here.display(),
                        shown.display(),
                        dir.uid
                    )));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(context(
                        io::Error::from_raw_os_error(libc::ELOOP),
                        path.display(),
                    ));
                }
                let target = rfs::readlinkat(&cur, &name, Vec::new())
                    .map_err(|e| context(e.into(), here.display()))?;
                let target = PathBuf::from(OsString::from_vec(target.into_bytes()));
                if target.is_absolute() {
                    cur = root_dir()?;
                    shown = PathBuf::from("/");
                }
                for c in walk_components(&target).into_iter().rev() {
                    todo.push_front(c);
                }
            }
            Err(e) => return Err(context(e.into(), here.display())),
        }
    }
    Ok(Dir {
        fd: cur,
        path: path.to_path_buf(),
    })
}

fn root_dir() -> io::Result<OwnedFd> {
    rfs::openat(rfs::CWD, "/", dir_flags(), Mode::empty()).map_err(|e| context(e.into(), "/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use crate::fsutil::test_util::{kind, open_to_all};

    #[test]
    fn a_symlink_in_a_directory_others_can_write_is_refused_on_the_way_and_at_the_end() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        let shared = open_to_all(t.path(), "shared");
        std::os::unix::fs::symlink(&real, shared.join("link")).unwrap();
        // As the final component and as a parent component.
        let e = Dir::open(&shared.join("link")).unwrap_err();
        assert_eq!(kind(e), io::ErrorKind::PermissionDenied);
        let e = Dir::open(&shared.join("link/sub")).unwrap_err();
        assert!(e.to_string().contains("does not follow"), "{e}");
        let e = Dir::create_all(&shared.join("link/sub/new"), 0o700).unwrap_err();
        assert_eq!(kind(e), io::ErrorKind::PermissionDenied);
        assert!(!real.join("sub/new").exists());
        let e = split(&shared.join("link/file")).unwrap_err();
        assert_eq!(kind(e), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn a_symlink_in_a_directory_only_we_can_write_is_followed() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("link")).unwrap();
        std::os::unix::fs::symlink("real/sub", t.path().join("rel")).unwrap();
        let d = Dir::open(&t.path().join("link/sub")).unwrap();
        d.create_file("x", 0o600).unwrap();
        assert!(real.join("sub/x").exists());
        let d = Dir::open(&t.path().join("rel/../sub")).unwrap();
        assert!(d.exists("x").unwrap());
    }

    #[test]
    fn a_folder_this_user_may_only_pass_through_is_walked() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        // Like wal-push (the OS user) in the repository's cluster folder (0710 root:group).
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let pass = t.path().join("pass");
        std::fs::create_dir_all(pass.join("inner")).unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(pass.join("inner"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let inner = pass.join("inner");
        let (listed, created) = std::thread::spawn(move || {
            // The file-system identity is per thread: this one acts as `nobody` alone.
            // SAFETY: setfsuid/setfsgid only change this thread's file-system ids.
            unsafe {
                libc::setfsgid(65534);
                libc::setfsuid(65534);
            }
            let listed = Dir::open(&pass).unwrap().entries().is_ok();
            let dir = Dir::open(&inner).unwrap();
            let created = dir.create_file("f", 0o600).is_ok() && dir.sync().is_ok();
            (listed, created)
        })
        .join()
        .unwrap();
        assert!(!listed, "a folder without read permission was listed");
        assert!(created);
        assert_eq!(
            std::fs::metadata(t.path().join("pass/inner/f"))
                .unwrap()
                .uid(),
            65534
        );
    }

    #[test]
    fn in_a_sticky_directory_only_links_of_root_or_ours_are_followed() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let sticky = t.path().join("tmp");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::symlink(&real, sticky.join("ours")).unwrap();
        std::os::unix::fs::symlink(&real, sticky.join("theirs")).unwrap();
        std::os::unix::fs::lchown(sticky.join("theirs"), Some(65534), Some(65534)).unwrap();
        assert!(Dir::open(&sticky.join("ours")).is_ok());
        let e = Dir::open(&sticky.join("theirs")).unwrap_err();
        assert_eq!(kind(e), io::ErrorKind::PermissionDenied);
        assert_eq!(
            std::fs::symlink_metadata(sticky.join("theirs"))
                .unwrap()
                .uid(),
            65534
        );
    }
}
