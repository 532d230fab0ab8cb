# shellcheck shell=bash
# Shared by scripts/cluster and bench/bringup: a local etcd plus N pgherd agents on loopback.
#
# Everything here is keyed on a state directory ($state below) laid out as:
#   <state>/etcd/data, <state>/etcd/etcd.log, <state>/etcd.pid
#   <state>/<node>.yml                member config (mode 0600: it holds passwords)
#   <state>/<node>.pid                the agent's pid
#   <state>/<node>/agent.log          the agent's stdout and stderr
#   <state>/<node>/data               PostgreSQL data dir (created and chowned by the agent)
#   <state>/<node>/data.log           PostgreSQL's log
#   <state>/run                       unix_socket_directories of every member
#
# Processes are only ever signalled by the pid we recorded, after checking that the pid
# still belongs to a process of this state directory (pids get reused).
#
# Source it after setting PGHERD_PROG (the script name used in messages).

PGHERD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGHERD_BIN_DIR=${PGHERD_BIN_DIR:-$PGHERD_ROOT/target/release}
PGHERD_PG_BIN_DIR=${PGHERD_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
PGHERD_OS_USER=${PGHERD_OS_USER:-postgres}
PGHERD_ETCD=${PGHERD_ETCD:-/usr/bin/etcd}
: "${PGHERD_PROG:=pgherd}"

say() { printf '%s: %s\n' "$PGHERD_PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PGHERD_PROG" "$*" >&2
    exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# Milliseconds on the monotonic-enough wall clock (good enough for second-scale timings).
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# ---------------------------------------------------------------------------------------
# Directories

# Can the PostgreSQL OS user reach (traverse into) directory $1? Only meaningful as root:
# otherwise PostgreSQL runs as the current user.
os_user_can_reach() {
    is_root || return 0
    id "$PGHERD_OS_USER" >/dev/null 2>&1 || return 1
    runuser -u "$PGHERD_OS_USER" -- test -x "$1" 2>/dev/null
}

# mkdir -p with mode 0755 on every directory it creates, so that PostgreSQL's OS user can
# traverse into data directories below it.
mkdir_reachable() {
    local dir=$1 missing=() d
    d=$dir
    while [[ ! -d $d ]]; do
        missing=("$d" "${missing[@]}")
        d=$(dirname "$d")
    done
    for d in "${missing[@]}"; do
        mkdir -m 0755 "$d" || die "cannot create directory $d"
    done
}

# A directory PostgreSQL writes into (its unix sockets): owned by the OS user when root.
mkdir_for_postgres() {
    mkdir_reachable "$1"
    if is_root; then
        chown "$PGHERD_OS_USER:" "$1" || die "cannot chown $1 to $PGHERD_OS_USER"
    fi
}

# ---------------------------------------------------------------------------------------
# Ports

port_in_use() {
    local port=$1
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

# Fails with a message naming every port in "$@" that something already listens on.
require_free_ports() {
    local busy=() p
    for p in "$@"; do
        port_in_use "$p" && busy+=("$p")
    done
    if ((${#busy[@]})); then
        die "port(s) ${busy[*]} already in use on this machine (see: ss -ltnp | grep -E ':(${busy[*]// /|})\\b'); stop whatever listens there, or if it is an earlier local cluster run: scripts/cluster down"
    fi
}

# Prints $2 free ports at or above $1, one per line, skipping ports in use.
pick_free_ports() {
    local port=$1 count=$2 found=0
    while ((found < count)); do
        ((port < 65535)) || die "no free port found above $1"
        if ! port_in_use "$port"; then
            echo "$port"
            found=$((found + 1))
        fi
        port=$((port + 1))
    done
}

# ---------------------------------------------------------------------------------------
# Processes

# Is pid $1 alive and does its command line contain $2 (a path of our state dir)?
pid_is_ours() {
    local pid=$1 marker=$2 cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$marker"* ]]
}

read_pid() { [[ -f $1 ]] && head -n1 "$1" 2>/dev/null; }

# stop_pids SIGNAL SECONDS ENTRY...: sends SIGNAL to every entry's pid, waits up to SECONDS
# for all to exit, then SIGKILLs the survivors. Each ENTRY is "pid|marker|label" (see
# pid_is_ours); pids that are no longer ours are skipped.
stop_pids() {
    local signal=$1 wait_s=$2 deadline entry pid marker label alive
    shift 2
    local -a live=()
    for entry in "$@"; do
        IFS='|' read -r pid marker label <<<"$entry"
        if pid_is_ours "$pid" "$marker"; then
            kill "-$signal" "$pid" 2>/dev/null && live+=("$entry")
        fi
    done
    ((${#live[@]})) || return 0
    deadline=$(($(now_ms) + wait_s * 1000))
    while (($(now_ms) < deadline)); do
        alive=0
        for entry in "${live[@]}"; do
            IFS='|' read -r pid marker label <<<"$entry"
            pid_is_ours "$pid" "$marker" && alive=1
        done
        ((alive)) || return 0
        sleep 0.1
    done
    for entry in "${live[@]}"; do
        IFS='|' read -r pid marker label <<<"$entry"
        if pid_is_ours "$pid" "$marker"; then
            say "$label (pid $pid) did not exit within $wait_s s of SIG$signal; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

# ---------------------------------------------------------------------------------------
# etcd

# Minimal HTTP GET over bash's /dev/tcp (curl is not on a fresh Debian); prints the response.
http_get() {
    local port=$1 path=$2
    # shellcheck disable=SC2016 # the inner script gets its values as $1 and $2
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3
        cat <&3' _ "$port" "$path" 2>/dev/null
}

etcd_healthy() { http_get "$1" /health | grep -q '"health":"true"'; }

# start_etcd STATE CLIENT_PORT PEER_PORT: starts a fresh single-member etcd and waits until
# it answers /health (30 s).
start_etcd() {
    local state=$1 client=$2 peer=$3 pid deadline
    mkdir_reachable "$state/etcd"
    # The ETCD_* environment variables would override our flags (and Debian's
    # /etc/default/etcd is not read by a bare etcd): start from a clean slate.
    nohup setsid env -u ETCD_NAME -u ETCD_DATA_DIR -u ETCD_INITIAL_CLUSTER \
        "$PGHERD_ETCD" \
        --name pgherd-local \
        --data-dir "$state/etcd/data" \
        --listen-client-urls "http://127.0.0.1:$client" \
        --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "pgherd-local=http://127.0.0.1:$peer" \
        --initial-cluster-state new \
        --logger zap --log-outputs stderr \
        >"$state/etcd/etcd.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$state/etcd.pid"
    deadline=$(($(now_ms) + 30000))
    until etcd_healthy "$client"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$state/etcd/etcd.log" >&2
            die "etcd exited during start-up; its log is $state/etcd/etcd.log (tail above)"
        fi
        (($(now_ms) < deadline)) || die "etcd did not become healthy on 127.0.0.1:$client within 30 s; see $state/etcd/etcd.log"
        sleep 0.1
    done
}

stop_etcd() {
    local state=$1 pid
    pid=$(read_pid "$state/etcd.pid") || return 0
    stop_pids TERM 15 "$pid|$state/etcd/data|etcd"
}

# ---------------------------------------------------------------------------------------
# Members

random_password() { od -An -N12 -tx1 /dev/urandom | tr -d ' \n'; }

# write_member_config STATE CLUSTER NODE ETCD_PORT API_PORT PG_PORT SUPERUSER_PW REPLICATION_PW TOKEN [HTTP_PORT [REPOSITORY]]
write_member_config() {
    local state=$1 cluster=$2 node=$3 etcd_port=$4 api_port=$5 pg_port=$6 su_pw=$7 repl_pw=$8 token=$9
    local http_port=${10:-} repo=${11:-} http="" backup=""
    local file="$state/$node.yml"
    if [[ -n $http_port ]]; then
        # Health checks and /metrics (GET /primary, /replica, ...).
        http="  http_listen: 127.0.0.1:$http_port"
    fi
    if [[ -n $repo ]]; then
        backup="backup: {repository: $repo, compression: zstd, retention: {full: 2}}"
    fi
    mkdir_reachable "$state/$node"
    (
        umask 077
        cat >"$file" <<EOF
# Written by scripts/lib.sh for a local cluster on loopback; regenerated on every start.
cluster: $cluster
name: $node
etcd:
  endpoints: [http://127.0.0.1:$etcd_port]
api:
  listen: 127.0.0.1:$api_port
  connect_address: 127.0.0.1:$api_port
$http
  # Loopback only: plain text is acceptable here; use api.tls on a network.
  plaintext: true
  auth_token: "$token"
postgres:
  listen: 127.0.0.1:$pg_port
  connect_address: 127.0.0.1:$pg_port
  data_dir: $state/$node/data
  bin_dir: $PGHERD_PG_BIN_DIR
  os_user: $PGHERD_OS_USER
  superuser: {username: postgres, password: "$su_pw"}
  replication: {username: replicator, password: "$repl_pw"}
  parameters:
    unix_socket_directories: "$state/run"
$backup
bootstrap:
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
EOF
    )
    # The file stays readable by its owner alone: archive_command (pgherd-agent wal-push),
    # run as PostgreSQL's user, reads the WAL settings the agent writes beside it
    # ($state/$node.wal.yml), which hold no secret.
}

# Writes the configs of nodes node1..nodeN. Ports: etcd client port, then the first API and
# first PostgreSQL port; member i gets first+i-1.
# Optional: HTTP_BASE (health checks on consecutive ports) and a backup REPOSITORY.
write_member_configs() {
    local state=$1 cluster=$2 count=$3 etcd_port=$4 api_base=$5 pg_base=$6 http_base=${7:-} repo=${8:-}
    local i su_pw repl_pw token
    su_pw=$(random_password)
    repl_pw=$(random_password)
    token=$(random_password)
    mkdir_for_postgres "$state/run"
    [[ -z $repo ]] || mkdir_for_postgres "$repo"
    for ((i = 1; i <= count; i++)); do
        write_member_config "$state" "$cluster" "node$i" "$etcd_port" \
            $((api_base + i - 1)) $((pg_base + i - 1)) "$su_pw" "$repl_pw" "$token" \
            "${http_base:+$((http_base + i - 1))}" "$repo"
    done
}

# Explains how the sockets would fail before PostgreSQL does (the limit is 107 bytes).
check_socket_path_length() {
    local path="$1/run/.s.PGSQL.65535"
    ((${#path} < 100)) || die "the state directory $1 is too deep for PostgreSQL's unix socket path ($path is ${#path} bytes; the limit is 107)"
}

start_agent() {
    local state=$1 node=$2
    nohup setsid "$PGHERD_BIN_DIR/pgherd-agent" --config "$state/$node.yml" \
        >"$state/$node/agent.log" 2>&1 </dev/null &
    echo "$!" >"$state/$node.pid"
}

# Node names that have a config in STATE, in order.
state_nodes() {
    local f
    for f in "$1"/node*.yml; do
        [[ -e $f ]] || continue
        f=${f##*/}
        echo "${f%.yml}"
    done
}

# Is the agent of NODE alive?
agent_alive() {
    local pid
    pid=$(read_pid "$1/$2.pid") || return 1
    pid_is_ours "$pid" "$1/$2.yml"
}

# Stops every agent of STATE (SIGTERM, 30 s, SIGKILL), then any PostgreSQL postmaster they
# left behind (found by the data dir's postmaster.pid, checked against its working dir).
stop_agents() {
    local state=$1 node pid entries=() pm leftovers=()
    for node in $(state_nodes "$state"); do
        pid=$(read_pid "$state/$node.pid") || continue
        entries+=("$pid|$state/$node.yml|agent $node")
    done
    ((${#entries[@]})) && stop_pids TERM 30 "${entries[@]}"
    for node in $(state_nodes "$state"); do
        pm=$(read_pid "$state/$node/data/postmaster.pid") || continue
        [[ $pm =~ ^[0-9]+$ ]] || continue
        if [[ $(readlink "/proc/$pm/cwd" 2>/dev/null) == "$state/$node/data" ]]; then
            say "PostgreSQL of $node (pid $pm) outlived its agent; shutting it down"
            # The postmaster's command line does not always name the data dir, but its
            # working directory is the data dir: use that as the ownership check.
            leftovers+=("$pm")
        fi
    done
    local p
    for p in "${leftovers[@]}"; do
        kill -INT "$p" 2>/dev/null || true # fast shutdown
    done
    for p in "${leftovers[@]}"; do
        local deadline=$(($(now_ms) + 15000))
        while [[ -d /proc/$p ]] && (($(now_ms) < deadline)); do sleep 0.1; done
        if [[ -d /proc/$p ]]; then
            say "PostgreSQL pid $p still running after 15 s; sending SIGQUIT (immediate shutdown)"
            kill -QUIT "$p" 2>/dev/null || true
            sleep 2
            [[ -d /proc/$p ]] && kill -KILL "$p" 2>/dev/null
        fi
    done
    return 0
}

# ---------------------------------------------------------------------------------------
# Cluster state through pgherdctl

# Prints "members leaders_running replicas_streaming" from `pgherdctl list --format json`,
# or fails if pgherdctl fails. JSON is read without jq (not on a fresh Debian): whitespace
# is dropped, the array is split into one object per line, and each object is matched for
# its role and state.
cluster_counts() {
    local config=$1 json flat members=0 leaders=0 replicas=0 obj
    json=$(timeout 5 "$PGHERD_BIN_DIR/pgherdctl" --config "$config" list --format json 2>/dev/null) || return 1
    flat=$(tr -d '[:space:]' <<<"$json")
    [[ $flat == \[*\] ]] || return 1
    flat=${flat#\[}
    flat=${flat%\]}
    while IFS= read -r obj; do
        [[ -n $obj ]] || continue
        members=$((members + 1))
        if [[ $obj == *'"role":"leader"'* && $obj == *'"state":"running"'* ]]; then
            leaders=$((leaders + 1))
        elif [[ $obj == *'"role":"replica"'* && $obj == *'"state":"streaming"'* ]]; then
            replicas=$((replicas + 1))
        fi
    done <<<"${flat//'},{'/$'}\n{'}"
    echo "$members $leaders $replicas"
}

# Prints the PostgreSQL port of the member with role leader, or fails.
leader_port() {
    local json flat obj
    json=$(timeout 5 "$PGHERD_BIN_DIR/pgherdctl" --config "$1" list --format json 2>/dev/null) || return 1
    flat=$(tr -d '[:space:]' <<<"$json")
    while IFS= read -r obj; do
        if [[ $obj == *'"role":"leader"'* && $obj =~ \"port\":([0-9]+) ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done <<<"${flat//'},{'/$'}\n{'}"
    return 1
}

# Healthy: exactly N members, one leader running and N-1 replicas streaming.
cluster_healthy() {
    local config=$1 n=$2 counts
    counts=$(cluster_counts "$config") || return 1
    [[ $counts == "$n 1 $((n - 1))" ]]
}

# Prints the last lines of every log of STATE to stderr.
print_log_tails() {
    local state=$1 lines=${2:-30} f
    for f in "$state"/etcd/etcd.log "$state"/node*/agent.log "$state"/node*/data.log; do
        [[ -f $f ]] || continue
        printf '\n===== last %s lines of %s =====\n' "$lines" "$f" >&2
        tail -n "$lines" "$f" >&2
    done
}

require_binaries() {
    local b
    # pgherd-agent starts the pgherd-watchdog next to it.
    for b in pgherd-agent pgherd-watchdog pgherdctl; do
        [[ -x $PGHERD_BIN_DIR/$b ]] || die "$PGHERD_BIN_DIR/$b is missing: build it with cargo build --release --bins"
    done
    [[ -x $PGHERD_ETCD ]] || die "$PGHERD_ETCD is missing: run scripts/install-deps"
    [[ -x $PGHERD_PG_BIN_DIR/postgres ]] || die "$PGHERD_PG_BIN_DIR/postgres is missing: run scripts/install-deps"
}
