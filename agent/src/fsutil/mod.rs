//! File operations of the root agent in directories that other users can write.
//!
//! The agent runs as root but works where the PostgreSQL OS user (or whoever can write the
//! backup repository) can create, rename and replace entries: the data directory and its
//! parent, the pgpass file, socket directories, the WAL archive, verify's scratch
//! directory. There a path handed to `open(2)` or `chown(2)` can be swapped for a symlink
//! between a check and the use, and root would then write or chown a file of the
//! attacker's choosing. Everything here works through open directory descriptors instead:
//!
//! - a configured path is resolved one component at a time (`openat` with `O_NOFOLLOW`);
//!   a symlink on the way is followed only when the directory holding it can be written by
//!   root (or the agent's own user) alone, so that an administrator's `/var/run -> /run`
//!   works and a link planted by another user is refused ([`Dir::open`]);
//! - a name inside a [`Dir`] is never followed: files are created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`, read with `O_NOFOLLOW | O_NONBLOCK` and only when they
//!   are regular files (a FIFO must not hang the loop), and chowned or chmodded through the
//!   descriptor that was opened, never by path;
//! - trees are walked and removed with `openat`, `fstatat` and `unlinkat`: a link in a tree
//!   is removed, never followed.
//!
//! Modes are set explicitly with `fchmod`, so the agent's umask (077) only decides what is
//! not set here.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Uid};

mod resolve;
pub use resolve::{split, split_create};

/// Who a new file or directory is given to: `Some((uid, gid))` when the agent runs as root
/// for another user (the postgres module's `OsUser::switch_to`), `None` to keep it.
pub type Owner = Option<(u32, u32)>;

/// Directory depth a tree walk goes to; deeper trees are refused rather than let a user who
/// can write them exhaust the agent's stack or descriptors.
const MAX_DEPTH: usize = 256;

/// What `fstatat` says about an entry.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub kind: FileType,
    /// The permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub modified: SystemTime,
}

impl Meta {
    fn from(st: &rfs::Stat) -> Meta {
        #[allow(clippy::unnecessary_cast)]
        let (mode, nlink, size, secs, nanos) = (
            st.st_mode as u32,
            st.st_nlink as u64,
            st.st_size as i64,
            st.st_mtime as i64,
            st.st_mtime_nsec as u32,
        );
        let modified = if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos.min(999_999_999))
        } else {
            SystemTime::UNIX_EPOCH
        };
        Meta {
            kind: FileType::from_raw_mode(mode),
            mode: mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink,
            size: size.max(0) as u64,
            modified,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }

    pub fn is_file(&self) -> bool {
        self.kind == FileType::RegularFile
    }

    /// Whether a user other than root and the agent's own can create, rename or remove
    /// entries in this directory.
    pub fn writable_by_others(&self) -> bool {
        !trusted_uid(self.uid)
            || self.mode & 0o002 != 0
            || (self.mode & 0o020 != 0 && self.gid != 0)
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

fn context(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Checks that `name` is one plain file name (not empty, `.`, `..`, nor holding a `/`).
pub fn check_name(name: &OsStr) -> io::Result<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(name)
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Opens directory `name` in `dir` without following a link. A directory this user may
/// pass through but not list (`wal-push` run as the OS user in the repository's 0710
/// cluster folder) is opened `O_PATH`: good for the `*at` calls below it, not for listing.
fn open_dir_fd(dir: impl AsFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    match rfs::openat(&dir, name, dir_flags(), Mode::empty()) {
        Err(rustix::io::Errno::ACCESS) => rfs::openat(
            &dir,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ),
        r => r,
    }
}

fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits & 0o7777)
}

/// Changes the owner of an open file or directory (nothing when `owner` is `None`).
pub fn fchown(fd: impl AsFd, owner: Owner) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        rfs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    Ok(())
}

/// An open directory: every operation names an entry in it and never follows a symlink.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory at `path`, resolving it one component at a time and following a
    /// symlink only where the directory holding it can be written by root (or this user)
    /// alone. A link planted by another user is refused with `PermissionDenied`.
    pub fn open(path: &Path) -> io::Result<Dir> {
        resolve::resolve(path, None)
    }

    /// [`Dir::open`], creating the missing directories with `mode` (owned by the agent's
    /// user; the mode is set with `fchmod`, whatever the umask).
    pub fn create_all(path: &Path, mode: u32) -> io::Result<Dir> {
        resolve::resolve(path, Some(mode))
    }

    /// Where this directory was opened (for messages and for programs given a path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// This directory's own metadata.
    pub fn meta(&self) -> io::Result<Meta> {
        Ok(Meta::from(&rfs::fstat(&self.fd)?))
    }

    /// The metadata of entry `name` (a symlink is described, not followed); `None` when
    /// there is no such entry.
    pub fn entry(&self, name: impl AsRef<OsStr>) -> io::Result<Option<Meta>> {
        let name = check_name(name.as_ref())?;
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta::from(&st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(context(e.into(), self.join(name).display())),
        }
    }

    pub fn exists(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        Ok(self.entry(name)?.is_some())
    }

    /// Opens subdirectory `name`; a symlink there is refused (`ELOOP` or `ENOTDIR`).
    pub fn open_dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let name = check_name(name.as_ref())?;
        let fd = open_dir_fd(&self.fd, name).map_err(|e| self.error(e, name))?;
        Ok(Dir {
            fd,
            path: self.join(name),
        })
    }

    /// Creates subdirectory `name` with `mode` (it must not exist) and opens it.
    pub fn create_dir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<Dir> {
        let name = check_name(name.as_ref())?;
        rfs::mkdirat(&self.fd, name, self::mode(mode)).map_err(|e| self.error(e, name))?;
        let dir = self.open_dir(name)?;
        dir.check_made_by_us()?;
        rfs::fchmod(&dir.fd, self::mode(mode))?;
        Ok(dir)
    }

    /// Opens subdirectory `name`, creating it with `mode` when missing; says whether it was
    /// created.
    pub fn ensure_dir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<(Dir, bool)> {
        let name = name.as_ref();
        loop {
            match self.create_dir(name, mode) {
                Ok(d) => return Ok((d, true)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            match self.open_dir(name) {
                Ok(d) => return Ok((d, false)),
                // Removed between the two calls: try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A directory we just created must be ours: another user who swapped the entry
    /// between `mkdirat` and `openat` gets an error, not our chown.
    fn check_made_by_us(&self) -> io::Result<()> {
        let m = self.meta()?;
        if m.uid != euid() {
            return Err(refused(format!(
                "{} was replaced by a directory of uid {} while it was being created",
                self.path.display(),
                m.uid
            )));
        }
        Ok(())
    }

    /// Creates file `name` with `mode` for writing; fails when any entry (a symlink too)
    /// already has that name.
    pub fn create_file(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        let name = check_name(name.as_ref())?;
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            self::mode(mode),
        )
        .map_err(|e| self.error(e, name))?;
        rfs::fchmod(&fd, self::mode(mode))?;
        Ok(File::from(fd))
    }

    /// Opens regular file `name` for reading; a symlink, FIFO, device or directory there is
    /// refused (opening never blocks).
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
        let name = check_name(name.as_ref())?;
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.error(e, name))?;
        let m = Meta::from(&rfs::fstat(&fd)?);
        if !m.is_file() {
            return Err(refused(format!(
                "{} is not a regular file; refusing to read it",
                self.join(name).display()
            )));
        }
        rfs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// Opens regular file `name` to append to it, creating it with `mode` when missing; a
    /// symlink, a non-regular file or a file with other hard links is refused.
    pub fn open_append(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        let name = check_name(name.as_ref())?;
        let flags = OFlags::WRONLY
            | OFlags::APPEND
            | OFlags::CREATE
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC;
        let fd = match rfs::openat(&self.fd, name, flags | OFlags::EXCL, self::mode(mode)) {
            Ok(fd) => {
                rfs::fchmod(&fd, self::mode(mode))?;
                fd
            }
            Err(rustix::io::Errno::EXIST) => rfs::openat(&self.fd, name, flags, self::mode(mode))
                .map_err(|e| self.error(e, name))?,
            Err(e) => return Err(self.error(e, name)),
        };
        let m = Meta::from(&rfs::fstat(&fd)?);
        if !m.is_file() || m.nlink != 1 {
            return Err(refused(format!(
                "{} is not a regular file with one link; refusing to write to it",
                self.join(name).display()
            )));
        }
        rfs::fcntl_setfl(&fd, OFlags::APPEND)?;
        Ok(File::from(fd))
    }

    /// The content of regular file `name` (see [`Dir::open_file`]), at most `limit` bytes.
    pub fn read(&self, name: impl AsRef<OsStr>, limit: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_file(name)?.take(limit).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Writes `contents` to `name` as a whole: a new temporary file (`<name>.pgherd-tmp`,
    /// whatever stood there removed first, never followed) given `mode` and `owner` through
    /// its descriptor, fsynced, then renamed over `name` and the directory fsynced.
    pub fn write_atomic(
        &self,
        name: impl AsRef<OsStr>,
        contents: &[u8],
        mode: u32,
        owner: Owner,
    ) -> io::Result<()> {
        let name = check_name(name.as_ref())?;
        let mut tmp = name.to_os_string();
        tmp.push(".pgherd-tmp");
        let mut attempts = 0;
        let mut file = loop {
            self.remove_tree(&tmp)?;
            match self.create_file(&tmp, mode) {
                Ok(f) => break f,
                // Someone made the name again since the removal: remove and retry a little.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
            }
        };
        let written = (|| {
            fchown(&file, owner)?;
            file.write_all(contents)?;
            file.sync_all()?;
            self.rename(&tmp, self, name)?;
            self.sync()
        })();
        if written.is_err() {
            let _ = rfs::unlinkat(&self.fd, &tmp, AtFlags::empty());
        }
        written
    }

    /// Creates symlink `name` here pointing at `target` (it must not exist) and gives the
    /// link itself to `owner`; nothing is followed.
    pub fn symlink(&self, target: &Path, name: impl AsRef<OsStr>, owner: Owner) -> io::Result<()> {
        let name = check_name(name.as_ref())?;
        rfs::symlinkat(target, &self.fd, name).map_err(|e| self.error(e, name))?;
        if let Some((uid, gid)) = owner {
            rfs::chownat(
                &self.fd,
                name,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.error(e, name))?;
        }
        Ok(())
    }

    /// The target of symlink `name` (read, never followed).
    pub fn read_link(&self, name: impl AsRef<OsStr>) -> io::Result<PathBuf> {
        let name = check_name(name.as_ref())?;
        let target =
            rfs::readlinkat(&self.fd, name, Vec::new()).map_err(|e| self.error(e, name))?;
        Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
    }

    /// Removes entry `name` if it is not a directory (a symlink itself, never its target).
    pub fn remove_file(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = check_name(name.as_ref())?;
        rfs::unlinkat(&self.fd, name, AtFlags::empty()).map_err(|e| self.error(e, name))
    }

    /// Removes empty subdirectory `name`.
    pub fn remove_dir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = check_name(name.as_ref())?;
        rfs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR).map_err(|e| self.error(e, name))
    }

    /// Removes entry `name` and, for a directory, everything in it; links are removed, never
    /// followed. A missing entry is no error.
    pub fn remove_tree(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        self.remove_tree_at(check_name(name.as_ref())?, 0)
    }

    fn remove_tree_at(&self, name: &OsStr, depth: usize) -> io::Result<()> {
        let Some(m) = self.entry(name)? else {
            return Ok(());
        };
        if m.is_dir() {
            if depth >= MAX_DEPTH {
                return Err(refused(format!(
                    "{} is nested deeper than {MAX_DEPTH} directories; not removing it",
                    self.join(name).display()
                )));
            }
            let sub = self.open_dir(name)?;
            sub.remove_contents_at(depth + 1)?;
            match self.remove_dir(name) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        } else {
            match self.remove_file(name) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        }
    }

    /// Removes everything in this directory (not the directory itself).
    pub fn remove_contents(&self) -> io::Result<()> {
        self.remove_contents_at(0)
    }

    fn remove_contents_at(&self, depth: usize) -> io::Result<()> {
        for (name, _) in self.entries()? {
            self.remove_tree_at(&name, depth)?;
        }
        Ok(())
    }

    /// Renames entry `from` here to `to` in `to_dir` (a symlink is moved, not followed).
    pub fn rename(
        &self,
        from: impl AsRef<OsStr>,
        to_dir: &Dir,
        to: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        let (from, to) = (check_name(from.as_ref())?, check_name(to.as_ref())?);
        rfs::renameat(&self.fd, from, &to_dir.fd, to).map_err(|e| {
            context(
                e.into(),
                format!(
                    "cannot rename {} to {}",
                    self.join(from).display(),
                    to_dir.join(to).display()
                ),
            )
        })
    }

    /// The entries of this directory (without `.` and `..`), with their types as the
    /// directory listing gives them (`fstatat` when it does not).
    pub fn entries(&self) -> io::Result<Vec<(OsString, FileType)>> {
        let mut out = Vec::new();
        let listing =
            rfs::Dir::read_from(&self.fd).map_err(|e| context(e.into(), self.path.display()))?;
        for entry in listing {
            let entry = entry.map_err(|e| context(e.into(), self.path.display()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsString::from_vec(name.to_vec());
            let kind = match entry.file_type() {
                FileType::Unknown => match self.entry(&name)? {
                    Some(m) => m.kind,
                    None => continue,
                },
                k => k,
            };
            out.push((name, kind));
        }
        Ok(out)
    }

    /// Gives this directory to `owner` through its descriptor.
    pub fn chown(&self, owner: Owner) -> io::Result<()> {
        fchown(&self.fd, owner).map_err(|e| context(e, self.path.display()))
    }

    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        rfs::fchmod(&self.fd, self::mode(mode)).map_err(|e| context(e.into(), self.path.display()))
    }

    /// Makes the entries' changes (creations, renames) durable. A directory opened
    /// `O_PATH` (this user may not read it) cannot be fsynced: nothing is done.
    pub fn sync(&self) -> io::Result<()> {
        match rfs::fsync(&self.fd) {
            Err(rustix::io::Errno::BADF) => Ok(()),
            r => r.map_err(|e| context(e.into(), self.path.display())),
        }
    }

    fn error(&self, e: rustix::io::Errno, name: &OsStr) -> io::Error {
        let path = self.join(name);
        match e {
            rustix::io::Errno::LOOP => refused(format!(
                "{} is a symlink; pgherd does not follow links there",
                path.display()
            )),
            e => context(e.into(), path.display()),
        }
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Helpers shared by the tests of this module and of `resolve`.
#[cfg(test)]
mod test_util {
    use std::io;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    /// A temp dir that any user could write (0777, not sticky): links in it are untrusted.
    pub fn open_to_all(parent: &Path, name: &str) -> PathBuf {
        let p = parent.join(name);
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        p
    }

    pub fn kind(e: io::Error) -> io::ErrorKind {
        e.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::test_util::{kind, open_to_all};

    #[test]
    fn names_inside_a_dir_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let shared = open_to_all(t.path(), "shared");
        let dir = Dir::open(&shared).unwrap();
        std::os::unix::fs::symlink(&victim, shared.join("conf.pgherd-tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, shared.join("link")).unwrap();
        std::os::unix::fs::symlink(t.path(), shared.join("dirlink")).unwrap();

        // Reading, appending, creating and opening a subdirectory through a link fail.
        assert_eq!(
            kind(dir.open_file("link").unwrap_err()),
            io::ErrorKind::PermissionDenied
        );
        assert!(dir.open_append("link", 0o600).is_err());
        assert_eq!(
            kind(dir.create_file("link", 0o600).unwrap_err()),
            io::ErrorKind::AlreadyExists
        );
        assert!(dir.open_dir("dirlink").is_err());
        // An atomic write replaces a planted temp link instead of writing through it.
        dir.write_atomic("conf", b"new", 0o600, None).unwrap();
        assert_eq!(std::fs::read_to_string(shared.join("conf")).unwrap(), "new");
        assert!(!shared.join("conf.pgherd-tmp").exists());
        // ... and a link at the final name itself is replaced, not written through.
        dir.write_atomic("link", b"replaced", 0o600, None).unwrap();
        assert!(!std::fs::symlink_metadata(shared.join("link"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Removing a tree holding a link to a directory removes the link only.
        let sub = dir.create_dir("tree", 0o700).unwrap();
        std::os::unix::fs::symlink(t.path(), shared.join("tree/up")).unwrap();
        sub.create_file("f", 0o600).unwrap();
        dir.remove_tree("tree").unwrap();
        assert!(!shared.join("tree").exists());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        for bad in ["", ".", "..", "a/b", "../victim"] {
            assert_eq!(
                kind(dir.create_file(bad, 0o600).unwrap_err()),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn create_file_refuses_an_existing_name_and_modes_ignore_the_umask() {
        let t = tempfile::tempdir().unwrap();
        let dir = Dir::open(t.path()).unwrap();
        std::fs::write(t.path().join("there"), "x").unwrap();
        assert_eq!(
            kind(dir.create_file("there", 0o600).unwrap_err()),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            kind(dir.create_dir("there", 0o700).unwrap_err()),
            io::ErrorKind::AlreadyExists
        );
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let (d, created) = dir.ensure_dir("d", 0o755).unwrap();
        let f = d.create_file("f", 0o640).unwrap();
        nix::sys::stat::umask(old);
        assert!(created);
        assert_eq!(d.meta().unwrap().mode, 0o755);
        assert_eq!(f.metadata().unwrap().mode() & 0o7777, 0o640);
        assert!(!dir.ensure_dir("d", 0o700).unwrap().1);
        let made = Dir::create_all(&t.path().join("a/b/c"), 0o711).unwrap();
        assert_eq!(made.meta().unwrap().mode, 0o711);
        assert_eq!(
            std::fs::metadata(t.path().join("a")).unwrap().mode() & 0o777,
            0o711
        );
    }

    #[test]
    fn reading_refuses_a_fifo_instead_of_blocking() {
        let t = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(
            &t.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let dir = Dir::open(t.path()).unwrap();
        assert_eq!(
            kind(dir.read("fifo", 10).unwrap_err()),
            io::ErrorKind::PermissionDenied
        );
        assert!(dir.open_append("fifo", 0o600).is_err());
        std::fs::write(t.path().join("f"), "hello").unwrap();
        assert_eq!(dir.read("f", 3).unwrap(), b"hel");
    }

    #[test]
    fn a_hard_linked_file_is_not_appended_to() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), "x").unwrap();
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        let dir = Dir::open(t.path()).unwrap();
        assert!(dir.open_append("b", 0o600).is_err());
        let mut f = dir.open_append("log", 0o640).unwrap();
        f.write_all(b"one").unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("log")).unwrap(),
            "one"
        );
    }

    #[test]
    fn remove_contents_walks_without_following() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f"), "keep").unwrap();
        let top = Dir::create_all(&t.path().join("top"), 0o700).unwrap();
        let sub = top.create_dir("sub", 0o700).unwrap();
        sub.create_file("f", 0o600).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), t.path().join("top/sub/link")).unwrap();
        std::os::unix::fs::symlink(&outside, t.path().join("top/dirlink")).unwrap();
        top.remove_contents().unwrap();
        assert!(top.entries().unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(outside.join("f")).unwrap(), "keep");
    }
}
