//! Asynchronous, parallel archiving (issue 16 item 4), the way pgBackRest's `archive-async`
//! works: `wal-push X` (PostgreSQL's `archive_command`) answers from a status file that a
//! background pusher writes once X is durable in the repository, and that pusher stores every
//! WAL file PostgreSQL has waiting (`archive_status/*.ready`), `backup.archive.parallel` at
//! a time, without waiting for PostgreSQL to ask for each.
//!
//! The status lives in `<pg_wal>/pgherd_archive/` (0700, PostgreSQL's OS user; PostgreSQL,
//! `pg_basebackup` and a restore never look at folders inside `pg_wal`):
//!
//! ```text
//! pusher.lock    flock'ed by the one running pusher
//! <name>.ok      "<sha256> <identity>": the file with that identity was stored
//! <name>.error   why the pusher could not store it
//! ```
//!
//! Safety (rule: a WAL file is acknowledged to PostgreSQL only once it is durable in the
//! repository): an `.ok` is written only after the store said the file is durable, and it
//! counts only for the very file it was written for, named by its identity (device, inode,
//! size, modification and change times to the nanosecond, taken from the open file before
//! and after it was read). A file replaced or rewritten since (`pg_rewind`, a copy) does
//! not match and is pushed again by `wal-push` itself. Whenever the pusher is not there
//! (never started, killed, failed on the file), `wal-push` pushes the file itself and its
//! answer is that push's, as without a pusher. Nothing but status is spooled, so there is no
//! spool to fill: WAL waits in `pg_wal`, where PostgreSQL keeps it until archived.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::compress;
use super::wal::{WalName, WalSink};

/// The status folder's name inside `pg_wal`.
pub const SPOOL: &str = "pgherd_archive";

/// How long a pusher with nothing to do waits for more before it exits.
pub const PUSHER_IDLE: Duration = Duration::from_secs(2);

/// How long `wal-push` waits for the pusher before it pushes its file itself.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// A short fingerprint of the WAL settings (their YAML): a status counts only for pushes
/// made with the same settings, so a pusher started before the repository changed cannot
/// answer for the new one.
pub fn fingerprint(settings: &str) -> String {
    compress::sha256_hex(settings.as_bytes())[..16].to_string()
}

/// A running pusher `wal-push` started and watches.
pub trait Running {
    /// Whether it still runs.
    fn alive(&mut self) -> bool;
}

impl Running for std::process::Child {
    fn alive(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }
}

/// What names a file on disk: the same name with another identity is another file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity(String);

impl Identity {
    fn of(m: &std::fs::Metadata) -> Identity {
        Identity(format!(
            "{}:{}:{}:{}.{:09}:{}.{:09}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ))
    }
}

/// `<pg_wal>/pgherd_archive`.
struct Spool {
    pg_wal: PathBuf,
    dir: PathBuf,
}

impl Spool {
    /// The spool of the `pg_wal` folder holding `file`; created when missing.
    fn open(pg_wal: &Path) -> std::io::Result<Spool> {
        let dir = pg_wal.join(SPOOL);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let m = std::fs::symlink_metadata(&dir)?;
                if !m.is_dir() {
                    return Err(std::io::Error::other(format!(
                        "{} is not a folder",
                        dir.display()
                    )));
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Spool {
            pg_wal: pg_wal.to_path_buf(),
            dir,
        })
    }

    fn marker(&self, name: &str, kind: &str) -> PathBuf {
        self.dir.join(format!("{name}.{kind}"))
    }

    /// Whether a pusher with settings `settings` stored exactly the file `name` that is on
    /// disk now.
    fn stored(&self, name: &str, settings: &str) -> bool {
        let Ok(text) = read_small(&self.marker(name, "ok")) else {
            return false;
        };
        let Ok(now) = std::fs::metadata(self.pg_wal.join(name)) else {
            return false;
        };
        let mut fields = text.split_whitespace().skip(1);
        fields.next() == Some(Identity::of(&now).0.as_str()) && fields.next() == Some(settings)
    }

    /// The pusher's error for `name`, removed: the caller pushes the file itself, and
    /// the pusher tries it again afterwards.
    fn take_error(&self, name: &str) -> Option<String> {
        let path = self.marker(name, "error");
        let text = read_small(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        Some(text)
    }

    /// Writes a status file under its final name complete or not at all (a reader sees the
    /// old one, none, or the new one). Not fsynced: a status lost in a crash only makes
    /// `wal-push` push the file again, which finds it archived.
    fn write(&self, name: &str, kind: &str, text: &str) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.{kind}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        drop(f);
        std::fs::rename(&tmp, self.marker(name, kind))
    }

    fn lock_file(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o600)
            .open(self.dir.join("pusher.lock"))
    }

    /// The pusher's lock, when no other process holds it.
    fn try_lock(&self) -> Option<Flock<File>> {
        Flock::lock(self.lock_file().ok()?, FlockArg::LockExclusiveNonblock).ok()
    }

    /// Whether a pusher holds the lock.
    fn pusher_running(&self) -> bool {
        match self.lock_file() {
            Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
            Err(_) => false,
        }
    }

    /// The WAL files waiting to be archived, history files first, then in name order.
    fn ready(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.pg_wal.join("archive_status")) else {
            return Vec::new();
        };
        let mut ready: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().to_string_lossy().into_owned();
                let n = f.strip_suffix(".ready")?.to_string();
                WalName::parse(&n).is_ok().then_some(n)
            })
            .collect();
        ready.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
        ready
    }

    /// Status files of files PostgreSQL no longer waits for (archived, or gone), and
    /// leftovers of interrupted writes, are removed. Listed before `ready` is read, so a
    /// status written meanwhile is not taken for a stale one.
    fn clean(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let files: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let waiting: HashSet<String> = self.ready().into_iter().collect();
        for f in files {
            // Only this pusher writes status files, and not while it cleans.
            let stale = if f.starts_with('.') && f.ends_with(".tmp") {
                true
            } else if let Some(name) = f.strip_suffix(".ok").or_else(|| f.strip_suffix(".error")) {
                !waiting.contains(name)
            } else {
                false
            };
            if stale {
                let _ = std::fs::remove_file(self.dir.join(&f));
            }
        }
    }
}

fn read_small(path: &Path) -> std::io::Result<String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let mut text = String::new();
    f.take(4096).read_to_string(&mut text)?;
    Ok(text)
}

/// The content of the WAL file at `path` and its identity, when it did not change while it
/// was read.
fn read_identified(path: &Path) -> std::io::Result<(Vec<u8>, Identity)> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let before = Identity::of(&f.metadata()?);
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    let after = Identity::of(&f.metadata()?);
    if before != after {
        return Err(std::io::Error::other(format!(
            "{} changed while it was read",
            path.display()
        )));
    }
    Ok((data, before))
}

/// Pushes the file at `path` in this process: what `wal-push` does without a pusher.
pub fn push_one(path: &Path, sink: &dyn WalSink) -> Result<(), String> {
    let (name, data) = super::wal::read_wal_file(path).map_err(|e| e.to_string())?;
    let sha = compress::sha256_hex(&data);
    if sink.done(&name, &sha) {
        return Ok(());
    }
    sink.push(&name, &sha, &data)
}

/// `wal-push` of the file at `path`: with `parallel` above 1, answered from the pusher's
/// status (starting a pusher with `start` when none runs); pushed here when the pusher
/// failed on it, is gone without storing it, or takes longer than `patience`.
pub fn push(
    path: &Path,
    parallel: u32,
    sink: &dyn WalSink,
    start: &dyn Fn(&Path) -> std::io::Result<Box<dyn Running>>,
    patience: Duration,
    settings: &str,
) -> Result<(), String> {
    let name = super::wal::wal_name_of(path).map_err(|e| e.to_string())?;
    let pg_wal = parent_or_here(path);
    // Without a .ready file (a push by hand) no pusher would ever take it.
    let waiting = pg_wal.join("archive_status").join(format!("{name}.ready"));
    let spool = match (parallel > 1 && waiting.exists()).then(|| Spool::open(pg_wal)) {
        Some(Ok(spool)) => spool,
        _ => return push_one(path, sink),
    };
    // PostgreSQL marks it archived next; a pusher looking in between only pushes it
    // again, which the repository answers as archived already.
    let acknowledged = || {
        let stored = spool.stored(&name, settings);
        if stored {
            let _ = std::fs::remove_file(spool.marker(&name, "ok"));
        }
        stored
    };
    let deadline = Instant::now() + patience;
    let mut mine: Option<Box<dyn Running>> = None;
    let mut started = 0;
    loop {
        if acknowledged() {
            return Ok(());
        }
        if spool.take_error(&name).is_some() {
            // Its own push says why, in PostgreSQL's log.
            return push_one(path, sink);
        }
        let alive = mine.as_mut().is_some_and(|p| p.alive()) || spool.pusher_running();
        if !alive {
            // It may have stored the file just before it left.
            if acknowledged() {
                return Ok(());
            }
            if started == 2 {
                return push_one(path, sink);
            }
            match start(pg_wal) {
                Ok(p) => mine = Some(p),
                Err(_) => return push_one(path, sink),
            }
            started += 1;
        }
        if Instant::now() > deadline {
            return push_one(path, sink);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether the postmaster of `data_dir` runs: its `postmaster.pid` names a live process.
/// PostgreSQL removes that file when it stops; after a crash the pid is dead. A pusher
/// works only for a running PostgreSQL, so it never outlives it.
pub fn postmaster_alive(data_dir: &Path) -> bool {
    use crate::postgres::process::{is_live, pid_of};
    read_small(&data_dir.join("postmaster.pid"))
        .is_ok_and(|text| pid_of(&text).is_some_and(is_live))
}

/// The folder `path` lies in, `.` for a bare name: pg_wal for `archive_command`'s `%p`,
/// the data directory for pg_wal itself (archive_command runs in the data directory).
pub fn parent_or_here(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The background pusher of `pg_wal`: stores every waiting WAL file, `parallel` at a time,
/// writing each one's status (with `settings`, the fingerprint of the settings it pushes
/// with), until nothing has waited for `idle`, `current` says to stop (the settings
/// changed, PostgreSQL stopped; asked before each file), or a status cannot be written.
/// Returns at once when another pusher runs.
pub fn run_pusher(
    pg_wal: &Path,
    parallel: u32,
    sink: &dyn WalSink,
    idle: Duration,
    settings: &str,
    current: &(dyn Fn() -> Result<(), String> + Sync),
) -> std::io::Result<()> {
    let spool = Spool::open(pg_wal)?;
    // The wal-push that started this one may be checking the lock this very moment.
    let deadline = Instant::now() + Duration::from_millis(200);
    let _lock = loop {
        if let Some(lock) = spool.try_lock() {
            break lock;
        }
        if Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut last_work = Instant::now();
    let stop = std::sync::Mutex::new(None);
    loop {
        if let Err(why) = current() {
            return Err(std::io::Error::other(why));
        }
        spool.clean();
        let todo: Vec<String> = spool
            .ready()
            .into_iter()
            // A status of another file under the same name (replaced since) does not
            // count: that file is pushed, and its conflict, if any, reported.
            .filter(|n| !spool.stored(n, settings) && !spool.marker(n, "error").exists())
            .collect();
        if todo.is_empty() {
            if last_work.elapsed() > idle || !pg_wal.is_dir() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let queue = std::sync::Mutex::new(todo.into_iter());
        let unwritable = std::sync::Mutex::new(None);
        let work = || loop {
            if let Err(why) = current() {
                *stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                return;
            }
            let Some(name) = queue.lock().ok().and_then(|mut q| q.next()) else {
                return;
            };
            let outcome = read_identified(&pg_wal.join(&name))
                .map_err(|e| e.to_string())
                .and_then(|(data, identity)| {
                    let sha = compress::sha256_hex(&data);
                    sink.push(&name, &sha, &data)?;
                    Ok(format!("{sha} {} {settings}\n", identity.0))
                });
            let written = match outcome {
                Ok(text) => spool.write(&name, "ok", &text),
                Err(e) => spool.write(&name, "error", &format!("{e}\n")),
            };
            if let Err(e) = written {
                // Without its status nobody learns the outcome: the pusher stops, and
                // each wal-push pushes its own file.
                *unwritable.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return;
            }
        };
        std::thread::scope(|s| {
            for _ in 1..parallel.max(1) {
                s.spawn(work);
            }
            work();
        });
        if let Some(why) = stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(std::io::Error::other(why));
        }
        if let Some(e) = unwritable.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot write a status in {}: {e}", spool.dir.display()),
            ));
        }
        last_work = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that records what it stored and fails for the names it is told to.
    #[derive(Default)]
    struct Store {
        stored: Mutex<Vec<(String, String)>>,
        failing: Mutex<Vec<String>>,
    }

    impl WalSink for Store {
        fn push(&self, name: &str, sha: &str, _data: &[u8]) -> Result<(), String> {
            if self.failing.lock().unwrap().iter().any(|f| f == name) {
                return Err(format!("{name}: store unreachable"));
            }
            let mut stored = self.stored.lock().unwrap();
            if let Some((_, s)) = stored.iter().find(|(n, _)| n == name) {
                if s != sha {
                    return Err(format!("{name} is archived already with other content"));
                }
                return Ok(());
            }
            stored.push((name.to_string(), sha.to_string()));
            Ok(())
        }
        fn done(&self, name: &str, sha: &str) -> bool {
            self.stored
                .lock()
                .unwrap()
                .iter()
                .any(|(n, s)| n == name && s == sha)
        }
    }

    impl Store {
        fn names(&self) -> Vec<String> {
            let mut n: Vec<String> = self
                .stored
                .lock()
                .unwrap()
                .iter()
                .map(|(n, _)| n.clone())
                .collect();
            n.sort();
            n
        }
    }

    /// A pusher on a thread (the agent starts a process).
    struct Thread(std::thread::JoinHandle<()>);

    impl Running for Thread {
        fn alive(&mut self) -> bool {
            !self.0.is_finished()
        }
    }

    fn pg_wal_with(ready: &[(&str, u8)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let pg_wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
        for (n, fill) in ready {
            std::fs::write(pg_wal.join(n), vec![*fill; 1000]).unwrap();
            std::fs::write(pg_wal.join("archive_status").join(format!("{n}.ready")), "").unwrap();
        }
        (dir, pg_wal)
    }

    fn seg(n: u32) -> String {
        format!("0000000100000000000000{n:02X}")
    }

    fn starter(
        store: Arc<Store>,
        starts: Arc<Mutex<u32>>,
    ) -> impl Fn(&Path) -> std::io::Result<Box<dyn Running>> {
        move |pg_wal: &Path| {
            *starts.lock().unwrap() += 1;
            let (store, pg_wal) = (store.clone(), pg_wal.to_path_buf());
            Ok(Box::new(Thread(std::thread::spawn(move || {
                run_pusher(
                    &pg_wal,
                    2,
                    &*store,
                    Duration::from_millis(300),
                    "S",
                    &|| Ok(()),
                )
                .unwrap();
            }))) as Box<dyn Running>)
        }
    }

    /// PostgreSQL's archiver: asks for each waiting file in order, marks it done on success.
    fn archive_in_order(
        pg_wal: &Path,
        names: &[String],
        store: &Arc<Store>,
        start: &dyn Fn(&Path) -> std::io::Result<Box<dyn Running>>,
    ) -> Vec<Result<(), String>> {
        names
            .iter()
            .map(|n| {
                let r = push(
                    &pg_wal.join(n),
                    2,
                    &**store,
                    start,
                    Duration::from_secs(20),
                    "S",
                );
                if r.is_ok() {
                    let s = pg_wal.join("archive_status");
                    std::fs::rename(s.join(format!("{n}.ready")), s.join(format!("{n}.done")))
                        .unwrap();
                }
                r
            })
            .collect()
    }

    #[test]
    fn one_pusher_stores_every_waiting_file_and_each_answer_is_its_own_files() {
        let names: Vec<String> = (1..=6).map(seg).collect();
        let files: Vec<(&str, u8)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u8))
            .collect();
        let (_dir, pg_wal) = pg_wal_with(&files);
        std::fs::write(pg_wal.join("archive_status").join("junk.ready"), "").unwrap();
        let store = Arc::new(Store::default());
        store.failing.lock().unwrap().push(names[3].clone());
        let starts = Arc::new(Mutex::new(0));
        let start = starter(store.clone(), starts.clone());
        let answers = archive_in_order(&pg_wal, &names, &store, &start);
        // 04 failed in the pusher and again in its own push: its answer is that failure;
        // every other file is stored and acknowledged.
        for (n, a) in names.iter().zip(&answers) {
            if *n == names[3] {
                assert!(
                    a.as_ref().unwrap_err().contains("store unreachable"),
                    "{a:?}"
                );
            } else {
                assert!(a.is_ok(), "{n}: {a:?}");
            }
        }
        let mut expect = names.clone();
        expect.remove(3);
        assert_eq!(store.names(), expect);
        assert_eq!(*starts.lock().unwrap(), 1, "one pusher did the work");
        // Once the store is back, the next try of 04 succeeds; the status files of
        // acknowledged files are cleaned away by the pusher.
        store.failing.lock().unwrap().clear();
        assert_eq!(
            archive_in_order(&pg_wal, &names[3..4], &store, &start),
            vec![Ok(())]
        );
        // (A pusher that is still running cleans up on its next look; this one, if none.)
        run_pusher(&pg_wal, 2, &*store, Duration::ZERO, "S", &|| Ok(())).unwrap();
        let spool = pg_wal.join(SPOOL);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<_> = std::fs::read_dir(&spool)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|f| f != "pusher.lock")
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "status files left: {left:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // parallel 1, or a file PostgreSQL does not wait for (no .ready, a push by hand):
        // pushed in the process, no pusher.
        let before = *starts.lock().unwrap();
        let (_dir2, pg_wal2) = pg_wal_with(&[(&seg(7), 7)]);
        push(
            &pg_wal2.join(seg(7)),
            1,
            &*store,
            &start,
            Duration::from_secs(5),
            "S",
        )
        .unwrap();
        assert!(!pg_wal2.join(SPOOL).exists());
        std::fs::write(pg_wal2.join(seg(8)), vec![8; 1000]).unwrap();
        push(
            &pg_wal2.join(seg(8)),
            2,
            &*store,
            &start,
            Duration::from_secs(5),
            "S",
        )
        .unwrap();
        assert!(store.names().contains(&seg(8)));
        assert_eq!(*starts.lock().unwrap(), before);
        // Not WAL: refused before anything.
        assert!(push(
            &pg_wal2.join("notwal"),
            2,
            &*store,
            &start,
            Duration::from_secs(5),
            "S",
        )
        .is_err());
    }

    #[test]
    fn a_status_for_another_file_of_the_same_name_is_not_an_answer() {
        // 01 (content A) and 02 were stored by a pusher, which wrote their status; then the
        // file under 01's name was replaced (content B: a rewind, a copy) and 02 rewritten
        // in place (same inode and size). Neither status may acknowledge the new content.
        let (n1, n2) = (seg(1), seg(2));
        let (_dir, pg_wal) = pg_wal_with(&[(&n1, 0xA), (&n2, 1)]);
        let store = Arc::new(Store::default());
        run_pusher(&pg_wal, 2, &*store, Duration::ZERO, "S", &|| Ok(())).unwrap();
        assert_eq!(store.names(), vec![n1.clone(), n2.clone()]);
        for n in [&n1, &n2] {
            assert!(pg_wal.join(SPOOL).join(format!("{n}.ok")).exists());
        }
        std::thread::sleep(Duration::from_millis(20));
        let tmp = pg_wal.join("replacement");
        std::fs::write(&tmp, vec![0xB; 1000]).unwrap();
        std::fs::rename(&tmp, pg_wal.join(&n1)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(pg_wal.join(&n2))
            .unwrap()
            .write_all(&[2; 1000])
            .unwrap();
        let starts = Arc::new(Mutex::new(0));
        let start = starter(store.clone(), starts.clone());
        for n in [&n1, &n2] {
            let e = push(
                &pg_wal.join(n),
                2,
                &*store,
                &start,
                Duration::from_secs(20),
                "S",
            )
            .unwrap_err();
            assert!(e.contains("other content"), "{n}: {e}");
        }
    }

    #[test]
    fn a_pusher_gone_without_a_status_leaves_the_push_to_wal_push() {
        // A pusher that dies between storing and writing the status (or before storing):
        // wal-push does not wait for it forever and answers from its own push.
        let n = seg(1);
        let (_dir, pg_wal) = pg_wal_with(&[(&n, 1)]);
        let store = Arc::new(Store::default());
        let starts = Arc::new(Mutex::new(0));
        let dying = {
            let starts = starts.clone();
            move |_: &Path| {
                *starts.lock().unwrap() += 1;
                Ok(Box::new(Thread(std::thread::spawn(|| {}))) as Box<dyn Running>)
            }
        };
        push(
            &pg_wal.join(&n),
            2,
            &*store,
            &dying,
            Duration::from_secs(20),
            "S",
        )
        .unwrap();
        assert_eq!(store.names(), vec![n.clone()]);
        assert_eq!(
            *starts.lock().unwrap(),
            2,
            "started twice, then pushed itself"
        );
        // And it is not acknowledged while the store refuses it.
        let n2 = seg(2);
        std::fs::write(pg_wal.join(&n2), vec![2; 1000]).unwrap();
        std::fs::write(
            pg_wal.join("archive_status").join(format!("{n2}.ready")),
            "",
        )
        .unwrap();
        store.failing.lock().unwrap().push(n2.clone());
        assert!(push(
            &pg_wal.join(&n2),
            2,
            &*store,
            &dying,
            Duration::from_secs(20),
            "S",
        )
        .is_err());
        // A planted status of a file never stored (no identity match) is no answer either.
        let n3 = seg(3);
        std::fs::write(pg_wal.join(&n3), vec![3; 1000]).unwrap();
        std::fs::write(
            pg_wal.join("archive_status").join(format!("{n3}.ready")),
            "",
        )
        .unwrap();
        std::fs::write(
            pg_wal.join(SPOOL).join(format!("{n3}.ok")),
            "x 1:2:1000:0.0:0.0\n",
        )
        .unwrap();
        store.failing.lock().unwrap().push(n3.clone());
        assert!(push(
            &pg_wal.join(&n3),
            2,
            &*store,
            &dying,
            Duration::from_secs(20),
            "S",
        )
        .is_err());
    }

    #[test]
    fn a_status_written_with_other_settings_is_no_answer_and_such_a_pusher_stops() {
        // A pusher of the old settings (another repository) stored 01 there; the new
        // settings' repository does not have it: wal-push must push it there itself.
        let n = seg(1);
        let (_dir, pg_wal) = pg_wal_with(&[(&n, 1)]);
        let old = Arc::new(Store::default());
        run_pusher(&pg_wal, 2, &*old, Duration::ZERO, "OLD", &|| Ok(())).unwrap();
        assert_eq!(old.names(), vec![n.clone()]);
        let new = Arc::new(Store::default());
        new.failing.lock().unwrap().push(n.clone());
        let starts = Arc::new(Mutex::new(0));
        let start = starter(new.clone(), starts.clone());
        // (The test's starter gives its pushers the settings "S".)
        let e = push(
            &pg_wal.join(&n),
            2,
            &*new,
            &start,
            Duration::from_secs(20),
            "NEW",
        );
        assert!(e.unwrap_err().contains("store unreachable"));
        // A pusher whose settings are no longer current stops before pushing anything.
        let (_dir2, pg_wal2) = pg_wal_with(&[(&seg(2), 2)]);
        let gone = Store::default();
        let changed = || Err("the WAL settings changed".to_string());
        assert!(run_pusher(&pg_wal2, 2, &gone, Duration::ZERO, "OLD", &changed).is_err());
        assert!(gone.names().is_empty());
    }

    #[test]
    fn a_pusher_stops_taking_files_once_postgres_is_gone() {
        let (dir, pg_wal) = pg_wal_with(&[(&seg(1), 1), (&seg(2), 2), (&seg(3), 3)]);
        let data_dir = dir.path();
        // Running: postmaster.pid names a live process (this one).
        std::fs::write(
            data_dir.join("postmaster.pid"),
            format!("{}\n{}\n", std::process::id(), data_dir.display()),
        )
        .unwrap();
        assert!(postmaster_alive(data_dir));
        // Crashed: the file stays, its process is dead.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        std::fs::write(data_dir.join("postmaster.pid"), format!("{}\n", dead.id())).unwrap();
        assert!(!postmaster_alive(data_dir));
        std::fs::write(data_dir.join("postmaster.pid"), "junk\n").unwrap();
        assert!(!postmaster_alive(data_dir));
        // Stopped: no file.
        std::fs::remove_file(data_dir.join("postmaster.pid")).unwrap();
        assert!(!postmaster_alive(data_dir));
        // PostgreSQL stops after the pusher took its first file: it takes no other.
        let asked = Mutex::new(0);
        let alive = || {
            let mut n = asked.lock().unwrap();
            *n += 1;
            if *n <= 2 {
                Ok(())
            } else {
                Err("PostgreSQL stopped".to_string())
            }
        };
        let store = Store::default();
        let e = run_pusher(&pg_wal, 1, &store, Duration::from_secs(30), "S", &alive).unwrap_err();
        assert!(e.to_string().contains("PostgreSQL stopped"), "{e}");
        assert_eq!(store.names(), vec![seg(1)]);
    }
}
