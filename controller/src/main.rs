//! pgherdctl: the administrator's tool for a pgherd cluster. It reads the cluster's state
//! from etcd and asks the agents (over gRPC) to change it.

mod agents;
mod backup;
mod cluster;
mod commands;
mod config_edit;
mod list;
mod prompt;
mod query;
mod standby;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "pgherdctl",
    version,
    about = "Inspect and manage a pgherd PostgreSQL cluster",
    long_about = "Inspect and manage a pgherd PostgreSQL cluster.\n\n\
        Point it at a cluster with --config (any member's pgherd config file: it gives the \
        cluster name, the etcd endpoints, the API's TLS files and the bearer token) or with \
        --endpoints and --cluster.\n\n\
        Exit status: 0 done, 1 refused or failed (the reason is printed), 2 usage error."
)]
pub struct Cli {
    /// A member's pgherd configuration file.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// etcd endpoints (comma-separated), instead of --config.
    #[arg(long, value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// Cluster name, with --endpoints.
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// Bearer token for requests that change the cluster. Visible to other users in the
    /// process list: prefer PGHERD_TOKEN, --token-file, or the config's api.auth_token(_file)
    /// (the default).
    #[arg(long, global = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File whose first line is the bearer token (instead of --token). PGHERD_TOKEN in the
    /// environment is read when neither is given, before the config's token.
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate that signed the agents' API certificates (default: from --config).
    #[arg(long, value_name = "FILE", global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate for agents that verify clients (default: from --config).
    #[arg(long, value_name = "FILE", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Key of --cert.
    #[arg(long, value_name = "FILE", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the agents' certificates carry in place of their member names, when they
    /// share one (default: from --config's api.tls.member_identity; without it each agent's
    /// certificate must name its member).
    #[arg(long, value_name = "NAME", global = true)]
    pub member_identity: Option<String>,
    /// Output format (csv: only for query).
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    pub format: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Which member `query` and `dsn` (and `restart --role`) mean.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum MemberRole {
    /// The member holding the leader key.
    #[value(alias = "primary")]
    Leader,
    /// A running replica (the least lagging).
    #[value(alias = "standby")]
    Replica,
    /// Any running member, the leader if there is one.
    Any,
}

/// What `flush` cancels.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum FlushWhat {
    /// Every member's scheduled restart.
    Restart,
    /// The scheduled switchover.
    Switchover,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show every member: role (leader/replica), state, timeline, lag, pending restarts;
    /// and whether the cluster is paused or has a switchover scheduled.
    List,
    /// Show the members as a replication tree: each replica under the member it streams
    /// from (the leader, or the member it cascades from with `replicatefrom`).
    Topology,
    /// Show the failover history: each promotion, its timeline, switch point and reason.
    History,
    /// Planned switchover without data loss: the leader stops cleanly and hands over to a
    /// caught-up replica (writes pause for well under a second).
    Switchover {
        /// The replica to hand over to (default: the most advanced eligible one).
        #[arg(long)]
        candidate: Option<String>,
        /// Switch over at this time instead of now (RFC 3339, e.g. 2026-11-26T03:00:00Z).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Cancel a scheduled switchover.
        #[arg(long, conflicts_with_all = ["candidate", "at"])]
        cancel: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Make the named replica the leader when there is no healthy leader.
    Failover {
        /// The replica to promote.
        #[arg(long)]
        candidate: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Maintenance mode: no automatic failover and no PostgreSQL restarts by the agents.
    Pause,
    /// Leave maintenance mode.
    Resume,
    /// Restart PostgreSQL on a member (or all), keeping its role: now, or at a scheduled
    /// time; only where the conditions hold (checked by each agent when it restarts).
    Restart {
        /// The member to restart.
        #[arg(required_unless_present = "all")]
        member: Option<String>,
        /// Restart every member, replicas first.
        #[arg(long, conflicts_with = "member")]
        all: bool,
        /// Only members whose changed parameters wait for a restart.
        #[arg(long)]
        pending: bool,
        /// Only members in this role at the time of the restart.
        #[arg(long, value_enum)]
        role: Option<MemberRole>,
        /// Only members whose running PostgreSQL is older than this version (15, 15.4).
        #[arg(long, value_name = "VERSION")]
        pg_version: Option<String>,
        /// Restart at this time instead of now (RFC 3339, e.g. 2026-11-26T03:00:00Z). Each
        /// agent keeps it in memory until then (an agent restart forgets it); pgherdctl
        /// flush CLUSTER restart cancels it.
        #[arg(long, value_name = "TIME")]
        scheduled: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Run SQL on a member's PostgreSQL (the leader if there is one, by default) and print the rows as a
    /// table, CSV (--format csv) or JSON. Connects as the config's superuser unless
    /// --username (then the password comes from PGPASSWORD).
    Query {
        /// The SQL (one or more statements). (-c is --config here, unlike patronictl.)
        #[arg(long, value_name = "SQL", conflicts_with = "file")]
        command: Option<String>,
        /// Read the SQL from this file (- for standard input).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Run it on this member.
        #[arg(short = 'm', long, conflicts_with = "role")]
        member: Option<String>,
        /// Run it on the leader, a replica (the least lagging), or any running member
        /// (default: any, the leader first).
        #[arg(short = 'r', long, value_enum)]
        role: Option<MemberRole>,
        /// The database.
        #[arg(short = 'd', long, default_value = "postgres")]
        dbname: String,
        /// Connect as this user instead of the superuser of --config.
        #[arg(short = 'U', long)]
        username: Option<String>,
    },
    /// Print a libpq connection string (host=... port=...) for a member, or for the
    /// leader, a replica or any member with --role (default: any, the leader first).
    Dsn {
        /// This member.
        #[arg(short = 'm', long, conflicts_with = "role")]
        member: Option<String>,
        /// The leader, a replica (the least lagging) or any running member.
        #[arg(short = 'r', long, value_enum)]
        role: Option<MemberRole>,
        /// Add dbname=DBNAME.
        #[arg(short = 'd', long)]
        dbname: Option<String>,
        /// Add user=USERNAME.
        #[arg(short = 'U', long)]
        username: Option<String>,
    },
    /// Delete every key of CLUSTER in etcd (configuration, history, initialize key), for
    /// a cluster that is gone or to bootstrap again. Refused while any agent is alive (a
    /// member key stands). Asks for the cluster name, then "Yes I am aware" (read from
    /// standard input, so a pipe can answer).
    Remove {
        /// The cluster's name, as --config names it.
        cluster: String,
        /// Do not ask.
        #[arg(long)]
        force: bool,
    },
    /// Cancel scheduled actions: every member's scheduled restart (restart) or the
    /// scheduled switchover (switchover).
    Flush {
        /// The cluster's name, as --config names it.
        cluster: String,
        #[arg(value_enum)]
        what: FlushWhat,
        /// With restart: only this member's (repeat for several; default: every member).
        #[arg(long = "member", value_name = "MEMBER")]
        members: Vec<String>,
    },
    /// Print pgherdctl's version and each member's agent version (as its member key says).
    Version {
        /// Only these members.
        members: Vec<String>,
    },
    /// Rewrite PostgreSQL's configuration from pgherd's and reload it (all members by default).
    Reload {
        /// Only this member.
        member: Option<String>,
    },
    /// Throw a replica's data directory away and clone the leader again.
    Reinit {
        member: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Take a base backup now (on the leader, or a replica with --from-replica), showing
    /// progress; `backup verify [ID]` proves a backup restores.
    Backup {
        #[command(subcommand)]
        action: Option<BackupAction>,
        /// Take it from a streaming replica instead of the leader.
        #[arg(long)]
        from_replica: bool,
        /// With --from-replica: this replica (default: the least lagging streaming one).
        #[arg(long, requires = "from_replica")]
        member: Option<String>,
        /// full: a complete copy. diff: only the files changed since the newest full
        /// backup (restore needs both; retention keeps them together); without a full
        /// backup a full one is taken, and the output says so.
        #[arg(long = "type", value_enum, default_value = "full")]
        kind: BackupKind,
    },
    /// List the base backups in the repository with their WAL range, size and last
    /// verification.
    Backups,
    /// Show a member's replication slots (the leader's by default): type, owner (member,
    /// permanent, ignored, or foreign: never touched by pgherd), active, WAL retained.
    Slots {
        /// This member instead of the leader.
        #[arg(long)]
        member: Option<String>,
    },
    /// Point-in-time restore of the whole cluster: the leader's data directory is replaced
    /// from a base backup and recovered to the target on a new timeline; the other members
    /// re-clone from it. The old data directory is kept until the restore succeeded.
    Restore {
        /// Recover up to this time (RFC 3339 with a zone, e.g. 2026-11-26T10:00:00Z).
        #[arg(long, value_name = "TIME", group = "target")]
        target_time: Option<String>,
        /// Recover up to this WAL position (e.g. 0/3000060).
        #[arg(long, value_name = "LSN", group = "target")]
        target_lsn: Option<String>,
        /// Recover up to this restore point (pg_create_restore_point).
        #[arg(long, value_name = "NAME", group = "target")]
        target_name: Option<String>,
        /// Recover up to this transaction (e.g. what txid_current() returned in it).
        #[arg(long, value_name = "XID", group = "target")]
        target_xid: Option<String>,
        /// Recover only to the end of the base backup (its earliest consistent point).
        #[arg(long, group = "target")]
        target_immediate: bool,
        /// Recover to the end of the archive.
        #[arg(long, group = "target")]
        latest: bool,
        /// With --target-time, --target-lsn or --target-xid: `false` stops just before the
        /// target instead of just after it (recovery_target_inclusive; default true).
        #[arg(long, value_name = "BOOL")]
        target_inclusive: Option<String>,
        /// Restore the tablespace that was at OLD to NEW instead (absolute paths; repeat
        /// for several). NEW must not exist or be an empty directory.
        #[arg(long = "tablespace-map", value_name = "OLD=NEW")]
        tablespace_map: Vec<String>,
        /// Start from this backup (default: the newest that can reach the target).
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
        /// Return once the restore has started instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the cluster-wide (dynamic) configuration stored in etcd.
    ShowConfig,
    /// Make this standby cluster (a disaster-recovery site) a normal one: removes the
    /// dynamic config's standby_cluster section, so its standby leader stops following the
    /// remote source, promotes and accepts writes. Refused when the cluster is not a standby
    /// cluster. First make sure the old primary site takes no more writes.
    PromoteCluster {
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Make this cluster a standby cluster of a remote PostgreSQL (another site's primary,
    /// or a proxy to it): sets the dynamic config's standby_cluster section; the leader
    /// stops accepting writes and streams from HOST:PORT as the standby leader, the others
    /// follow it. Refused when the cluster already is a standby cluster.
    DemoteCluster {
        /// The remote source's host name or address.
        #[arg(long)]
        host: String,
        /// The remote source's PostgreSQL port.
        #[arg(long)]
        port: u16,
        /// The replication slot to stream with on the remote (created there, not by this
        /// cluster).
        #[arg(long, value_name = "SLOT")]
        primary_slot_name: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Planned site switch without losing an acknowledged commit: this cluster (a normal
    /// one) becomes a standby cluster of the other site's standby leader, and the other
    /// site (a standby cluster of this one, reached with --to-config) is promoted once its
    /// standby leader has replayed this site's shutdown checkpoint.
    SwitchSite {
        /// A member configuration file of the other site's cluster (its etcd, token, TLS).
        #[arg(long, value_name = "FILE")]
        to_config: PathBuf,
        /// Seconds to wait for each step (the demotion, the replay, the promotion).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Where this site follows the other from after the switch (its standby_cluster
        /// host), e.g. a proxy to the other site's leader; default: the other site's
        /// standby leader's PostgreSQL address.
        #[arg(long, value_name = "HOST", requires = "follow_port")]
        follow_host: Option<String>,
        /// The port with --follow-host.
        #[arg(long, value_name = "PORT", requires = "follow_host")]
        follow_port: Option<u16>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Upgrade the cluster to a newer PostgreSQL major: checks (every member healthy and
    /// caught up, the new binaries on every member, pg_upgrade --check on the leader), then
    /// pauses the cluster, stops the replicas, runs pg_upgrade on the leader and starts it
    /// on the new major, gathers statistics, has the replicas clone the new leader, and
    /// resumes. A failure before the leader's first start on the new major puts the old
    /// cluster back; after it, --resume goes on where it stopped.
    Upgrade {
        /// The new major's binaries (the same path on every member).
        #[arg(long, value_name = "DIR", conflicts_with = "to", required_unless_present_any = ["to", "resume"])]
        to_bin_dir: Option<PathBuf>,
        /// The new major, for Debian's layout: /usr/lib/postgresql/MAJOR/bin.
        #[arg(long, value_name = "MAJOR")]
        to: Option<u32>,
        /// pg_upgrade's transfer mode: link (hard links, fastest; the old data directory
        /// cannot be started afterwards), clone (reflinks, where the file system has them)
        /// or copy.
        #[arg(long, value_parser = ["link", "clone", "copy"], default_value = "link")]
        method: String,
        /// Only check (pg_upgrade --check on the leader); change nothing.
        #[arg(long, conflicts_with = "resume")]
        check: bool,
        /// Go on with an upgrade that stopped (from the `upgrade` key in etcd).
        #[arg(long, conflicts_with_all = ["to_bin_dir", "to"])]
        resume: bool,
        /// Seconds to wait for the replicas to stream from the upgraded leader.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Change the cluster-wide configuration: with --set, with --apply FILE (the whole
    /// YAML document), or else in $EDITOR on its YAML. Validated like the file, the change
    /// is shown before it is applied, and members that need a PostgreSQL restart are marked.
    EditConfig {
        /// KEY=VALUE, e.g. ttl=20 or postgresql.parameters.work_mem=64MB (empty value
        /// removes the key). Repeat for several keys.
        #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "apply")]
        set: Vec<String>,
        /// Apply the YAML in FILE (- for standard input) as a patch, like one --set per key
        /// it gives: a null value removes the key, keys it leaves out stay as they are.
        #[arg(long, value_name = "FILE", conflicts_with = "replace")]
        apply: Option<PathBuf>,
        /// Replace the whole configuration with the YAML in FILE (- for standard input):
        /// keys it leaves out are removed (their defaults apply).
        #[arg(long, value_name = "FILE", conflicts_with = "set")]
        replace: Option<PathBuf>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
}

/// `pgherdctl backup --type`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BackupKind {
    Full,
    Diff,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Diff => "diff",
        }
    }
}

#[derive(Subcommand)]
pub enum BackupAction {
    /// Restore a backup (default: the newest) and the archive into a scratch directory,
    /// recover to the end of the archive, check it with pg_amcheck and a row count, and
    /// report pass or fail (exit 1 on fail).
    Verify {
        /// The backup's id (see pgherdctl backups).
        id: Option<String>,
    },
}

/// Usage errors (bad flags, missing confirmation) exit 2; refusals and failures exit 1.
pub enum Failure {
    Usage(String),
    Refused(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Refused(e.to_string())
    }
}

fn main() -> ExitCode {
    pgherd_agent::install_crypto_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgherdctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("pgherdctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("pgherdctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
