# shellcheck shell=bash
# Shared by the drill scripts in docker/drills/: the compose cluster's containers, pgherdctl
# through `docker exec`, the writer (pgherd-bench drill-writer through HAProxy), waiting with
# deadlines, healing, and the one-line JSON result.
#
# Source it after setting DRILL (the drill's name). Every wait is bounded in time.

DRILL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DRILL_BIN_DIR=${PGHERD_BIN_DIR:-${CARGO_TARGET_DIR:-$DRILL_ROOT/target}/release}
DRILL_NETWORK=pgherd-drill
DRILL_NODES=(node1 node2 node3)
DRILL_ETCDS=(etcd1 etcd2 etcd3)
DRILL_RW_PORT=${PGHERD_RW_PORT:-5000}
DRILL_STATS_PORT=${PGHERD_STATS_PORT:-7000}
# Seconds the cluster gets to become healthy again after a drill heals it.
DRILL_HEAL_TIMEOUT=${DRILL_HEAL_TIMEOUT:-120}
: "${DRILL:=drill}"

say() { printf '%s: %s\n' "$DRILL" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$DRILL" "$*" >&2
    exit 1
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# docker-compose (Debian's v1) or the `docker compose` plugin, from the repository root.
compose() {
    if command -v docker-compose >/dev/null 2>&1; then
        (cd "$DRILL_ROOT" && docker-compose "$@")
    else
        (cd "$DRILL_ROOT" && docker compose "$@")
    fi
}

container() { echo "pgherd-$1"; }

# running | paused | exited | ... ; empty if the container does not exist.
container_state() { docker inspect -f '{{.State.Status}}' "$(container "$1")" 2>/dev/null; }

connected() {
    local nets
    nets=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(container "$1")" 2>/dev/null) || return 1
    [[ " $nets " == *" $DRILL_NETWORK "* ]]
}

# pgherdctl ARGS... in the first member container that is running, not paused and answers;
# member configs name every etcd member, so any healthy member will do.
ctl() {
    local node
    for node in "${DRILL_NODES[@]}"; do
        [[ $(container_state "$node") == running ]] || continue
        if timeout 15 docker exec "$(container "$node")" \
            pgherdctl --config /etc/pgherd/pgherd.yml "$@" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

# One member object per line from `pgherdctl list --format json`, whitespace removed (no jq
# needed: it is not on a fresh Debian).
members_flat() {
    local json flat
    json=$(ctl list --format json) || return 1
    flat=$(tr -d '[:space:]' <<<"$json")
    [[ $flat == \[*\] ]] || return 1
    flat=${flat#\[}
    flat=${flat%\]}
    [[ -n $flat ]] || return 1
    printf '%s\n' "${flat//'},{'/$'}\n{'}"
}

# The name of the member that is leader and running, or fails.
leader() {
    local obj
    while IFS= read -r obj; do
        if [[ $obj == *'"role":"leader"'* && $obj == *'"state":"running"'* && $obj =~ \"name\":\"([a-z0-9_]+)\" ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done < <(members_flat)
    return 1
}

# Names of the replicas that are streaming, one per line.
streaming_replicas() {
    local obj
    while IFS= read -r obj; do
        if [[ $obj == *'"role":"replica"'* && $obj == *'"state":"streaming"'* && $obj =~ \"name\":\"([a-z0-9_]+)\" ]]; then
            echo "${BASH_REMATCH[1]}"
        fi
    done < <(members_flat)
}

# HAProxy's servers that are UP in backend $1 (primary or replicas), from its statistics
# page as CSV, fetched over bash's /dev/tcp (curl is not on a fresh Debian).
haproxy_up() {
    local csv
    # shellcheck disable=SC2016 # the inner script gets its port as $1
    csv=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET /;csv HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
        cat <&3' _ "$DRILL_STATS_PORT" 2>/dev/null) || return 1
    awk -F, -v b="$1" '$1 == b && $2 != "FRONTEND" && $2 != "BACKEND" && $18 == "UP" { n++ } END { print n + 0 }' <<<"$csv"
}

# What healthy looks at, in one line for a drill's note: each member's role and state, and
# how many servers HAProxy has UP behind ports 5000 and 5001.
health_summary() {
    local obj out=""
    while IFS= read -r obj; do
        [[ $obj =~ \"name\":\"([a-z0-9_]+)\" ]] && out+="${BASH_REMATCH[1]}"
        [[ $obj =~ \"role\":\"([a-z_]+)\" ]] && out+=" ${BASH_REMATCH[1]}"
        [[ $obj =~ \"state\":\"([a-z_ ]+)\" ]] && out+=" ${BASH_REMATCH[1]}"
        out+=", "
    done < <(members_flat 2>/dev/null)
    printf '%shaproxy up: primary %s, replicas %s' "$out" "$(haproxy_up primary || echo '?')" \
        "$(haproxy_up replicas || echo '?')"
}

# Healthy: three members, one leader running, two replicas streaming, and HAProxy sending
# port 5000 (and the Patroni-style 5010) to one server and port 5001 (5011) to two.
healthy() {
    local flat members leaders=0 replicas=0 obj
    flat=$(members_flat) || return 1
    members=$(grep -c . <<<"$flat")
    while IFS= read -r obj; do
        [[ $obj == *'"role":"leader"'* && $obj == *'"state":"running"'* ]] && leaders=$((leaders + 1))
        [[ $obj == *'"role":"replica"'* && $obj == *'"state":"streaming"'* ]] && replicas=$((replicas + 1))
    done <<<"$flat"
    [[ $members == 3 && $leaders == 1 && $replicas == 2 ]] || return 1
    [[ $(haproxy_up primary) == 1 && $(haproxy_up replicas) == 2 ]] || return 1
    # The listeners written as Patroni's docs write them for Patroni route the same.
    [[ $(haproxy_up patroni_primary) == 1 && $(haproxy_up patroni_replicas) == 2 ]]
}

# healthy, and a replica is a synchronous standby (the drill cluster runs synchronous_mode:
# on): right after a failover the new leader's sync key names nobody until a standby has
# flushed past its changes, and while it names nobody no member may take over (a fault then
# would be waited out, not failed over).
synced() {
    healthy || return 1
    members_flat | grep '"role":"replica"' | grep -Eq '"sync_state":"(sync|quorum)"'
}

# wait_for SECONDS DESCRIPTION COMMAND...: runs COMMAND every 0.5 s until it succeeds (0) or
# SECONDS have passed (1, with a message).
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(($(now_ms) + secs * 1000))
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        if (($(now_ms) >= deadline)); then
            say "timed out after ${secs} s waiting for: $what"
            return 1
        fi
        sleep 0.5
    done
}

# Puts every container back: unpaused, started, on the drill network.
heal_all() {
    local s c state
    for s in "${DRILL_ETCDS[@]}" "${DRILL_NODES[@]}" haproxy; do
        c=$(container "$s")
        state=$(container_state "$s")
        case $state in
        paused) docker unpause "$c" >/dev/null ;;
        running) ;;
        "") die "container $c does not exist: is the cluster up (docker-compose up -d)?" ;;
        *) docker start "$c" >/dev/null ;;
        esac
        connected "$s" || docker network connect "$DRILL_NETWORK" "$c" >/dev/null 2>&1 || true
    done
}

# ---------------------------------------------------------------------------------------
# The writer

WRITER_PID=
WRITER_DIR=

# writer_start: starts pgherd-bench drill-writer through HAProxy's read-write port into the
# table drill_<name> and waits until it has 50 acknowledgements.
writer_start() {
    local bench=$DRILL_BIN_DIR/pgherd-bench table
    [[ -x $bench ]] || die "$bench is missing: cargo build --release -p pgherd-bench"
    WRITER_DIR=$(mktemp -d /tmp/pgherd-drill.XXXXXX)
    table=drill_${DRILL//-/_}
    "$bench" drill-writer --port "$DRILL_RW_PORT" \
        --password-file "$DRILL_ROOT/docker/secrets/superuser" \
        --table "$table" --max-duration 10m --status "$WRITER_DIR/status" \
        >"$WRITER_DIR/result.json" 2>"$WRITER_DIR/writer.log" &
    WRITER_PID=$!
    trap 'drill_cleanup' EXIT
    wait_for 60 "the writer's first 50 acknowledged rows through port $DRILL_RW_PORT" writer_acks_at_least 50 ||
        {
            cat "$WRITER_DIR/writer.log" >&2
            return 1
        }
}

# On exit, also after a failure half-way: stop the writer, remove its files, and put every
# container back (unpaused, started, connected) so that the next drill finds a cluster that
# can heal.
# (writer_stop runs in a command substitution, so WRITER_PID may name a writer that has
# exited already: nothing here may fail under set -e.)
drill_cleanup() {
    if [[ -n $WRITER_PID ]]; then kill -TERM "$WRITER_PID" 2>/dev/null || true; fi
    if [[ -n $WRITER_DIR ]]; then rm -rf -- "$WRITER_DIR" || true; fi
    heal_all 2>/dev/null || true
}

# Fields of the writer's status file.
writer_status() {
    local line
    line=$(cat "$WRITER_DIR/status" 2>/dev/null) || return 1
    [[ $line =~ acks=([0-9]+)\ last_ack_ms=([0-9]+) ]] || return 1
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}
writer_acks_at_least() {
    local acks last
    read -r acks last < <(writer_status) || return 1
    ((acks >= $1))
}
# Has a row been acknowledged after epoch milliseconds $1?
writer_acked_after() {
    local acks last
    read -r acks last < <(writer_status) || return 1
    ((last > $1))
}
# Has no row been acknowledged for $1 seconds?
writer_stalled_for() {
    local acks last
    read -r acks last < <(writer_status) || return 1
    (($(now_ms) - last >= $1 * 1000))
}

# Stops the writer, which then reads the table back through HAProxy; prints its JSON line.
writer_stop() {
    local i
    kill -TERM "$WRITER_PID" 2>/dev/null || true
    # The writer needs up to a few seconds to finish its insert, then up to 60 s to read back.
    for ((i = 0; i < 900; i++)); do
        kill -0 "$WRITER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$WRITER_PID" 2>/dev/null; then
        kill -KILL "$WRITER_PID" 2>/dev/null || true
        say "the writer did not finish within 90 s of SIGTERM"
    fi
    wait "$WRITER_PID" 2>/dev/null || true
    WRITER_PID=
    sed 's/^/  writer: /' "$WRITER_DIR/writer.log" >&2
    cat "$WRITER_DIR/result.json"
}

json_number() {
    local json=$1 key=$2
    [[ $json =~ \"$key\":([0-9.]+) ]] && echo "${BASH_REMATCH[1]}"
}

# finish WRITER_JSON OK [NOTE]: prints the drill's result line and exits 0 if OK is 1, the
# writer verified its table, nothing acknowledged was lost and the cluster is healthy.
finish() {
    local writer=$1 ok=$2 note=${3:-} outage lost final pass=true started=${DRILL_STARTED_MS:-0}
    outage=$(json_number "$writer" write_outage_s) || outage=null
    lost=$(json_number "$writer" acked_rows_lost) || lost=null
    [[ $writer == *'"verified":true'* ]] || {
        ok=0
        note="${note:+$note; }the writer could not read its table back"
    }
    [[ $lost == 0 ]] || ok=0
    final=$(leader) || final=""
    healthy || {
        ok=0
        note="${note:+$note; }cluster not healthy at the end ($(health_summary))"
    }
    ((ok)) || pass=false
    printf '{"drill":"%s","write_outage_s":%s,"acked_rows_lost":%s,"final_leader":"%s","pass":%s,"duration_s":%s,"note":"%s","writer":%s}\n' \
        "$DRILL" "$outage" "$lost" "$final" "$pass" "$((($(now_ms) - started) / 1000))" "$note" "${writer:-null}"
    [[ $pass == true ]]
}

# drill_begin: the cluster must be healthy (waits up to DRILL_HEAL_TIMEOUT); starts the
# writer. Prints the leader's name.
drill_begin() {
    DRILL_STARTED_MS=$(now_ms)
    heal_all
    wait_for "$DRILL_HEAL_TIMEOUT" "a healthy cluster before the drill" healthy ||
        die "the cluster is not healthy before the drill: $(ctl list 2>&1 || true)"
    writer_start || die "the writer could not write through 127.0.0.1:$DRILL_RW_PORT"
}

# heal_and_wait: heal_all, then wait for a healthy cluster; fails after DRILL_HEAL_TIMEOUT.
heal_and_wait() {
    heal_all
    wait_for "$DRILL_HEAL_TIMEOUT" "a healthy cluster after healing" healthy
}
