//! pgherd-agent: keeps one PostgreSQL member of a pgherd cluster in its right role.
//! See docs/architecture.md for the shape: observe (etcd, PostgreSQL), decide (`ha`, pure), act.

pub mod agent;
pub mod api;
pub mod backup;
pub mod board;
pub mod callbacks;
pub mod dcs;
pub mod failpoint;
pub mod fsutil;
pub mod ha;
pub mod listing;
pub mod logging;
pub mod lsn;
pub mod postgres;
pub mod slots;
pub mod systemd;
pub mod watchdog;

/// Now as RFC 3339 (UTC, whole seconds), for what humans and etcd keys read.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Now as RFC 3339 (UTC, milliseconds), for the switchover key's times: decide measures a
/// handover's timeout from them.
pub fn now_rfc3339_millis() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Makes *ring* rustls's process-wide crypto provider. rustls picks one by itself only when
/// exactly one of its `ring` and `aws-lc-rs` features is on; the object-store client
/// (reqwest) turns on the second, and tonic's TLS (the API, etcd) then had none and
/// panicked. Called before anything builds a TLS configuration; idempotent.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    });
}
