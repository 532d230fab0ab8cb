//! WAL through the agent: `wal-push` and `wal-fetch` run as PostgreSQL's OS user, which
//! must never hold the repository's credentials (an object store's keys, issue 16), so
//! they hand WAL to the agent over a local socket and the agent (root) stores and fetches
//! it.
//!
//! The socket lives beside the member's configuration file (`<stem>.wal.sock`, in a
//! directory root controls), mode 0660, group PostgreSQL's: only root and that user can
//! connect, and the agent checks each peer's uid (`SO_PEERCRED`); the client checks the
//! server's too (root, or its own uid when the agent runs unprivileged).
//!
//! One request per connection, a header line then bytes:
//!
//! ```text
//! PUSH <name> <sha256> <len>\n<len bytes>   ->  OK stored | OK already | ERR <message>
//! DONE <name> <sha256>\n                    ->  YES | NO
//! FETCH <name>\n                            ->  OK <len>\n<bytes> | NOTFOUND <message> | ERR <message>
//! ```
//!
//! `DONE` says whether this agent stored exactly that content under that name since it
//! started (a `wal-push` whose pusher failed or left asks before it pushes). `FETCH`
//! of a segment starts fetching the next `backup.archive.prefetch` segments of its timeline,
//! which later requests take from memory.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::wal::{self, WalError, WalName};
use super::BackupContext;

/// The longest header line.
const MAX_HEADER: usize = 512;
/// The largest file pushed: a segment (history and backup history files are smaller).
const MAX_PUSH: u64 = wal::SEGMENT_SIZE;

/// `<dir>/<stem>.wal.sock` beside the member's configuration file.
pub fn path_beside(config_file: &Path) -> PathBuf {
    let stem = config_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pgherd".to_string());
    config_file.with_file_name(format!("{stem}.wal.sock"))
}

/// What a fetch ended with, shareable between the request that started it and the one
/// that takes it from the prefetch cache.
#[derive(Clone, Debug)]
enum Fetched {
    Data(Arc<Vec<u8>>),
    NotFound(String),
    Failed(String),
}

type Pending = Shared<BoxFuture<'static, Fetched>>;

struct Server {
    ctx: BackupContext,
    /// `(name, sha256)` of what this agent stored since it started.
    pushed: Mutex<HashSet<(String, String)>>,
    /// Segments fetched ahead, by name.
    prefetched: Mutex<HashMap<String, Pending>>,
    prefetch: u32,
    /// Who may connect besides root and this process's user: PostgreSQL's OS user.
    allowed_uid: Option<u32>,
}

/// Listens on `path` until `stop`. The socket is created anew (an old one is removed),
/// 0660 with group `gid`.
pub async fn serve(
    ctx: BackupContext,
    path: PathBuf,
    owner: Option<(u32, u32)>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => anyhow::bail!("{} is a directory", path.display()),
        Ok(_) => std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove the old socket {}", path.display()))?,
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    if let Some((_, gid)) = owner {
        std::os::unix::fs::lchown(&path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
    }
    tracing::info!(socket = %path.display(), "serving wal-fetch (with prefetch) and, for backup.archive.through_agent, wal-push through the agent");
    let server = Arc::new(Server {
        prefetch: ctx.backup.archive_prefetch(),
        ctx,
        pushed: Mutex::new(HashSet::new()),
        prefetched: Mutex::new(HashMap::new()),
        allowed_uid: owner.map(|(uid, _)| uid),
    });
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = std::fs::remove_file(&path);
                return Ok(());
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let server = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = server.handle(stream).await {
                        tracing::debug!(error = %e, "a wal-push/wal-fetch connection failed");
                    }
                });
            }
        }
    }
}

impl Server {
    async fn handle(self: Arc<Self>, stream: tokio::net::UnixStream) -> std::io::Result<()> {
        let uid = stream.peer_cred()?.uid();
        let me = nix::unistd::geteuid().as_raw();
        let (read, mut write) = stream.into_split();
        if uid != 0 && uid != me && Some(uid) != self.allowed_uid {
            tracing::warn!(uid, "refused a wal-push/wal-fetch connection from a user other than root and postgres.os_user");
            write
                .write_all(b"ERR only root and postgres.os_user may use this socket\n")
                .await?;
            return Ok(());
        }
        let mut read = tokio::io::BufReader::new(read);
        let mut line = Vec::new();
        (&mut read)
            .take(MAX_HEADER as u64)
            .read_until(b'\n', &mut line)
            .await?;
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        let words: Vec<&str> = line.split(' ').collect();
        let answer = match words.as_slice() {
            ["PUSH", name, sha, len] => {
                let len: u64 = len.parse().unwrap_or(u64::MAX);
                if len > MAX_PUSH {
                    format!("ERR {name}: {len} bytes is more than a WAL file holds\n").into_bytes()
                } else {
                    let mut data = Vec::with_capacity(len as usize);
                    (&mut read).take(len).read_to_end(&mut data).await?;
                    if data.len() as u64 != len {
                        return Ok(());
                    }
                    self.push(name, sha, data).await.into_bytes()
                }
            }
            ["DONE", name, sha] => {
                let done = self
                    .pushed
                    .lock()
                    .unwrap()
                    .contains(&(name.to_string(), sha.to_string()));
                if done { "YES\n" } else { "NO\n" }.as_bytes().to_vec()
            }
            ["FETCH", name] => {
                // The segment goes out from the cache's own buffer, not a copy of it.
                let (head, body) = self.fetch(name).await;
                write.write_all(&head).await?;
                if let Some(body) = body {
                    write.write_all(&body).await?;
                }
                return write.shutdown().await;
            }
            _ => b"ERR unknown request\n".to_vec(),
        };
        write.write_all(&answer).await?;
        write.shutdown().await
    }

    async fn push(&self, name: &str, sha: &str, data: Vec<u8>) -> String {
        let ctx = self.ctx.clone();
        let owned = name.to_string();
        let result = tokio::task::spawn_blocking(move || {
            let actual = super::compress::sha256_hex(&data);
            let pushed = wal::push_bytes(
                ctx.repo.as_ref(),
                &owned,
                &data,
                ctx.backup.compression,
                ctx.backup.level(),
            );
            (actual, pushed)
        })
        .await;
        match result {
            Ok((actual, _)) if actual != sha => {
                format!("ERR {name}: received content has sha256 {actual}, not {sha}\n")
            }
            Ok((actual, Ok(p))) => {
                self.pushed
                    .lock()
                    .unwrap()
                    .insert((name.to_string(), actual));
                match p {
                    wal::Pushed::Stored => "OK stored\n".to_string(),
                    wal::Pushed::AlreadyArchived => "OK already\n".to_string(),
                }
            }
            Ok((_, Err(e))) => {
                tracing::warn!(file = name, error = %e, "could not archive a WAL file");
                format!("ERR {}\n", one_line(&e.to_string()))
            }
            Err(e) => format!("ERR the archiving task died: {e}\n"),
        }
    }

    /// Starts fetching `name` (not awaited).
    fn start_fetch(&self, name: &str) -> Pending {
        let ctx = self.ctx.clone();
        let owned = name.to_string();
        let task = tokio::task::spawn_blocking(move || wal::read(ctx.repo.as_ref(), &owned));
        async move {
            match task.await {
                Ok(Ok(data)) => Fetched::Data(Arc::new(data)),
                Ok(Err(WalError::NotFound(n))) => Fetched::NotFound(n),
                Ok(Err(e)) => Fetched::Failed(e.to_string()),
                Err(e) => Fetched::Failed(format!("the fetching task died: {e}")),
            }
        }
        .boxed()
        .shared()
    }

    /// The answer to `FETCH name`: its first line, and the segment's bytes after it.
    async fn fetch(&self, name: &str) -> (Vec<u8>, Option<Arc<Vec<u8>>>) {
        let parsed = match WalName::parse(name) {
            Ok(p) => p,
            Err(e) => return (format!("ERR {e}\n").into_bytes(), None),
        };
        let ahead = self.prefetched.lock().unwrap().remove(name);
        let fetched_ahead = ahead.is_some();
        // Not fetched ahead: this one starts before the segments after it, which recovery
        // does not wait for yet.
        let pending = ahead.unwrap_or_else(|| self.start_fetch(name));
        self.prefetch_after(&parsed);
        let mut got = pending.await;
        // A segment fetched ahead before it was archived, or while the store failed: asked
        // again, so only a fetch made for this request answers.
        if fetched_ahead && !matches!(got, Fetched::Data(_)) {
            got = self.start_fetch(name).await;
        }
        match got {
            Fetched::Data(data) => (format!("OK {}\n", data.len()).into_bytes(), Some(data)),
            Fetched::NotFound(n) => (
                format!("NOTFOUND {n} is not in the archive\n").into_bytes(),
                None,
            ),
            Fetched::Failed(e) => (format!("ERR {}\n", one_line(&e)).into_bytes(), None),
        }
    }

    /// Starts fetching the `prefetch` segments after `after` on its timeline, and forgets
    /// those fetched ahead that recovery went past.
    fn prefetch_after(&self, after: &WalName) {
        let (WalName::Segment { timeline, segno }, n) = (after, self.prefetch) else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut cache = self.prefetched.lock().unwrap();
        cache.retain(|k, _| match WalName::parse(k) {
            Ok(WalName::Segment {
                timeline: t,
                segno: s,
            }) => t == *timeline && s > *segno,
            _ => false,
        });
        for next in segno + 1..=segno + u64::from(n) {
            let name = wal::segment_name(*timeline, crate::lsn::Lsn(next * wal::SEGMENT_SIZE));
            cache
                .entry(name)
                .or_insert_with_key(|name| self.start_fetch(name));
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// The client side, run by `wal-push` and `wal-fetch`.
pub struct Client {
    socket: PathBuf,
}

/// What a fetch through the agent ended with.
pub enum FetchError {
    NotFound(String),
    /// No agent (or not root's) at the socket: a directory repository is read directly.
    Unreachable(String),
    Failed(String),
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    /// Connects and checks that root (or this user) listens, not someone who planted a
    /// socket.
    fn connect(&self) -> Result<StdStream, String> {
        let s = StdStream::connect(&self.socket).map_err(|e| {
            format!(
                "cannot reach the agent at {}: {e} (wal-push and wal-fetch go through the running agent, backup.archive.through_agent)",
                self.socket.display()
            )
        })?;
        let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| {
                format!(
                    "{}: cannot read the peer's credentials: {e}",
                    self.socket.display()
                )
            })?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != 0 && cred.uid() != me {
            return Err(format!(
                "{}: the process listening there runs as uid {}, not root: refusing to hand it WAL",
                self.socket.display(),
                cred.uid()
            ));
        }
        let timeout = Some(std::time::Duration::from_secs(600));
        let _ = s.set_read_timeout(timeout);
        let _ = s.set_write_timeout(timeout);
        Ok(s)
    }

    fn answer_line(r: &mut impl BufRead) -> Result<String, String> {
        let mut line = String::new();
        r.take(MAX_HEADER as u64)
            .read_line(&mut line)
            .map_err(|e| format!("the agent did not answer: {e}"))?;
        if line.is_empty() {
            return Err("the agent closed the connection without an answer".to_string());
        }
        Ok(line.trim_end().to_string())
    }

    /// Stores `data` as WAL file `name`; returns once the agent says it is durable.
    pub fn push(&self, name: &str, sha: &str, data: &[u8]) -> Result<(), String> {
        let mut s = self.connect()?;
        s.write_all(format!("PUSH {name} {sha} {}\n", data.len()).as_bytes())
            .and_then(|_| s.write_all(data))
            .map_err(|e| format!("cannot send {name} to the agent: {e}"))?;
        let line = Self::answer_line(&mut BufReader::new(s))?;
        match line.strip_prefix("OK") {
            Some(_) => Ok(()),
            None => Err(line.strip_prefix("ERR ").unwrap_or(&line).to_string()),
        }
    }

    /// Whether the agent stored this content under `name` already.
    pub fn done(&self, name: &str, sha: &str) -> Result<bool, String> {
        let mut s = self.connect()?;
        s.write_all(format!("DONE {name} {sha}\n").as_bytes())
            .map_err(|e| format!("cannot ask the agent about {name}: {e}"))?;
        Ok(Self::answer_line(&mut BufReader::new(s))? == "YES")
    }

    /// Fetches WAL file `name` into `dest`: written to a temporary name beside it as it
    /// arrives (1 MiB at a time, never held whole), renamed once every byte is there.
    pub fn fetch_into(&self, name: &str, dest: &std::path::Path) -> Result<(), FetchError> {
        let mut s = self.connect().map_err(FetchError::Unreachable)?;
        s.write_all(format!("FETCH {name}\n").as_bytes())
            .map_err(|e| FetchError::Failed(format!("cannot ask the agent for {name}: {e}")))?;
        let mut r = BufReader::with_capacity(1 << 20, s);
        let line = Self::answer_line(&mut r).map_err(FetchError::Failed)?;
        if let Some(len) = line.strip_prefix("OK ") {
            let len: u64 = len
                .parse()
                .map_err(|_| FetchError::Failed(format!("the agent answered {line:?}")))?;
            return wal::write_fetched_from(&mut r.take(len), len, dest)
                .map_err(|e| FetchError::Failed(format!("receiving {name}: {e}")));
        }
        if let Some(m) = line.strip_prefix("NOTFOUND ") {
            return Err(FetchError::NotFound(m.to_string()));
        }
        Err(FetchError::Failed(
            line.strip_prefix("ERR ").unwrap_or(&line).to_string(),
        ))
    }
}
