//! Free loopback ports for etcd, the agents' APIs and PostgreSQL.
//!
//! A port is found by binding `127.0.0.1:0` and releasing it; the kernel picks from its
//! ephemeral range at a random offset, so parallel test processes rarely collide. Within one
//! process a port is never handed out twice, even after its first user is gone.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback TCP port that was free a moment ago and that this process has not handed out
/// before.
pub fn free_port() -> Result<u16> {
    // A panic elsewhere while holding the lock leaves the set intact: keep using it.
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .context("cannot bind 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("cannot read the address of a bound listener")?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("the kernel kept offering ports this test process already handed out")
}
