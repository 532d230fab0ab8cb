# shellcheck shell=bash
# Shared by the disaster-recovery drills (dr-switch, dr-failover), on top of lib.sh: the DR
# site of docker-compose.dr.yml brought up and down, pgherdctl for either site through the
# controller container (pgherd-drctl, which holds a member configuration of each), what
# healthy means for a primary site and for a standby site, and the result line.
#
# Source it after lib.sh. Every wait is bounded in time.

DR_PROJECT=pgherd-dr
DR_FILE=docker-compose.dr.yml
WAN_NETWORK=pgherd-wan
DR_NODES=(dr1 dr2 dr3)
# The primary site's containers that join the replication network.
MAIN_WAN=(haproxy node1 node2 node3)
DR_STATS_PORT=${PGHERD_DR_STATS_PORT:-7100}
# The controller's read-write port to whichever site takes writes: the DR drills' writer.
ANY_RW_PORT=${PGHERD_ANY_RW_PORT:-5200}
# Seconds the DR site gets to copy the primary site and stream (first bring-up).
DR_UP_TIMEOUT=${DR_UP_TIMEOUT:-180}

dr_compose() { compose -p "$DR_PROJECT" -f "$DR_FILE" "$@"; }

# site_ctl SITE ARGS...: pgherdctl in the controller with site main's or dr's member config.
site_ctl() {
    local site=$1
    shift
    timeout 30 docker exec pgherd-drctl pgherdctl --config "/etc/pgherd/$site.yml" "$@"
}

# site_flat SITE: one member object per line of `list --format json` (as members_flat).
site_flat() {
    local json flat
    json=$(site_ctl "$1" list --format json 2>/dev/null) || return 1
    flat=$(tr -d '[:space:]' <<<"$json")
    [[ $flat == \[*\] ]] || return 1
    flat=${flat#\[}
    flat=${flat%\]}
    [[ -n $flat ]] || return 1
    printf '%s\n' "${flat//'},{'/$'}\n{'}"
}

# site_leader SITE STATE: the leader's name if its state is STATE (running: takes writes;
# streaming: the standby leader of a standby cluster).
site_leader() {
    local obj
    while IFS= read -r obj; do
        if [[ $obj == *'"role":"leader"'* && $obj == *"\"state\":\"$2\""* && $obj =~ \"name\":\"([a-z0-9_]+)\" ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done < <(site_flat "$1")
    return 1
}

# site_timeline SITE NAME
site_timeline() {
    local obj
    while IFS= read -r obj; do
        if [[ $obj == *"\"name\":\"$2\""* && $obj =~ \"timeline\":([0-9]+) ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done < <(site_flat "$1")
    return 1
}

# site_healthy SITE LEADER_STATE: three members, the leader in LEADER_STATE, two replicas
# streaming.
site_healthy() {
    local flat members leaders=0 replicas=0 obj
    flat=$(site_flat "$1") || return 1
    members=$(grep -c . <<<"$flat")
    while IFS= read -r obj; do
        [[ $obj == *'"role":"leader"'* && $obj == *"\"state\":\"$2\""* ]] && leaders=$((leaders + 1))
        [[ $obj == *'"role":"replica"'* && $obj == *'"state":"streaming"'* ]] && replicas=$((replicas + 1))
    done <<<"$flat"
    [[ $members == 3 && $leaders == 1 && $replicas == 2 ]]
}

# The DR site as a standby cluster: a standby leader streaming from the primary site, two
# replicas streaming from it.
dr_standby_healthy() { site_healthy dr streaming; }
# The DR site promoted: its leader takes writes, two replicas stream, and its HAProxy sends
# port 5100 to one server and 5101 to two.
dr_primary_healthy() {
    site_healthy dr running || return 1
    [[ $(DRILL_STATS_PORT=$DR_STATS_PORT haproxy_up primary) == 1 &&
        $(DRILL_STATS_PORT=$DR_STATS_PORT haproxy_up replicas) == 2 ]]
}

# psql_in MEMBER SQL: one query on MEMBER's PostgreSQL over its socket, unaligned output.
psql_in() {
    # shellcheck disable=SC2016 # expanded by the container's shell
    timeout 15 docker exec "$(container "$1")" sh -c \
        'PGPASSWORD=$(cat /etc/pgherd/secrets/superuser) PGCONNECT_TIMEOUT=3 psql -h /run/postgresql -U postgres -d postgres -XAtqc "$1"' \
        _ "$2" 2>/dev/null
}

# The host MEMBER's WAL receiver streams from, if it streams.
sender_host() {
    psql_in "$1" "SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'"
}
# streams_from MEMBER HOST
streams_from() { [[ $(sender_host "$1") == "$2" ]]; }

# replayed_past MEMBER LSN
replayed_past() { [[ $(psql_in "$1" "SELECT pg_last_wal_replay_lsn() >= '$2'::pg_lsn") == t ]]; }

dr_is_up() {
    local s
    for s in dr-etcd "${DR_NODES[@]}" dr-haproxy drctl; do
        [[ $(container_state "$s") == running ]] || return 1
    done
}

# dr_up: the replication network, the primary site's HAProxy and members on it, the DR site
# up (docker-compose -p pgherd-dr -f docker-compose.dr.yml up -d), and waits for it to stream.
# Does nothing but the wait when it is up already. Sets DR_BRINGUP_S.
dr_up() {
    local t s
    t=$(now_ms)
    docker network inspect "$WAN_NETWORK" >/dev/null 2>&1 ||
        docker network create "$WAN_NETWORK" >/dev/null || die "docker network create $WAN_NETWORK failed"
    for s in "${MAIN_WAN[@]}"; do
        docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(container "$s")" 2>/dev/null |
            grep -qw "$WAN_NETWORK" ||
            docker network connect "$WAN_NETWORK" "$(container "$s")" ||
            die "cannot connect $(container "$s") to $WAN_NETWORK: is the primary site up?"
    done
    if ! dr_is_up; then
        say "bringing the DR site up: docker-compose -p $DR_PROJECT -f $DR_FILE up -d"
        dr_compose up -d >&2 2>&1 || die "docker-compose -p $DR_PROJECT -f $DR_FILE up -d failed"
    fi
    if ! wait_for "$DR_UP_TIMEOUT" "the DR site's standby leader and two replicas streaming" dr_standby_healthy; then
        site_ctl dr list >&2 || true
        for s in "${DR_NODES[@]}"; do
            printf '\n===== docker logs --tail 30 %s =====\n' "$(container "$s")" >&2
            docker logs --tail 30 "$(container "$s")" >&2 2>&1 || true
        done
        return 1
    fi
    DR_BRINGUP_S=$((($(now_ms) - t) / 1000))
    say "DR site streaming after ${DR_BRINGUP_S} s"
}

# dr_down: the DR site removed with its volumes, the primary site's containers off the
# replication network, and the network removed.
dr_down() {
    local s
    dr_compose down -v -t 10 >/dev/null 2>&1 || say "docker-compose -p $DR_PROJECT down -v failed"
    for s in "${MAIN_WAN[@]}"; do
        docker network disconnect -f "$WAN_NETWORK" "$(container "$s")" >/dev/null 2>&1 || true
    done
    docker network rm "$WAN_NETWORK" >/dev/null 2>&1 || true
}

# dr_restore: back to the primary site alone, taking writes: the writer stopped, the DR site
# removed, every primary-site container started, and the primary site promoted if a
# switch-site left it a standby cluster (of the DR site, now gone). Then waits for it.
dr_restore() {
    if [[ -n $WRITER_PID ]]; then kill -TERM "$WRITER_PID" 2>/dev/null || true; fi
    say "restoring: removing the DR site, starting the primary site's containers"
    dr_down
    heal_all
    if wait_for 30 "the primary site's configuration" ctl show-config &&
        ctl show-config 2>/dev/null | grep -q standby_cluster; then
        say "the primary site is a standby cluster of the removed DR site: promote-cluster"
        ctl promote-cluster --force >&2 || true
    fi
    wait_for "$DRILL_HEAL_TIMEOUT" "a healthy primary site after the DR drill" healthy
}

# On exit: the writer stopped and its files removed; unless DR_KEEP_ON_EXIT=1 (the drill
# succeeded and leaves the environment as it found it), dr_restore.
DR_KEEP_ON_EXIT=0
dr_cleanup() {
    if ((DR_KEEP_ON_EXIT)); then
        if [[ -n $WRITER_PID ]]; then kill -TERM "$WRITER_PID" 2>/dev/null || true; fi
    else
        dr_restore >/dev/null 2>&1 || true
    fi
    if [[ -n $WRITER_DIR ]]; then rm -rf -- "$WRITER_DIR" || true; fi
}

# writer_start (lib.sh) sets this as the EXIT trap.
drill_cleanup() { dr_cleanup; }

# dr_begin: a healthy primary site, the DR site streaming, and the writer writing through
# the controller's any-site port.
dr_begin() {
    DRILL_STARTED_MS=$(now_ms)
    DR_BRINGUP_S=0
    heal_all
    wait_for "$DRILL_HEAL_TIMEOUT" "a healthy primary site before the drill" healthy ||
        die "the primary site is not healthy before the drill: $(ctl list 2>&1 || true)"
    trap 'dr_cleanup' EXIT
    dr_up || die "the DR site did not stream within ${DR_UP_TIMEOUT} s"
    DRILL_RW_PORT=$ANY_RW_PORT
    writer_start || die "the writer could not write through 127.0.0.1:$DRILL_RW_PORT"
}

# dr_finish WRITER_JSON OK NOTE LOSS_FAILS EXTRA: the result line, and exit status 0 if OK
# is 1, the writer verified its table and (LOSS_FAILS=1) nothing acknowledged was lost.
# EXTRA: more JSON fields, `"key":value,` each, put after `duration_s`.
dr_finish() {
    local writer=$1 ok=$2 note=$3 loss_fails=$4 extra=$5 outage lost pass=true
    outage=$(json_number "$writer" write_outage_s) || outage=null
    lost=$(json_number "$writer" acked_rows_lost) || lost=null
    [[ $writer == *'"verified":true'* ]] || {
        ok=0
        note="${note:+$note; }the writer could not read its table back"
    }
    if ((loss_fails)) && [[ $lost != 0 ]]; then
        ok=0
        note="${note:+$note; }acknowledged rows lost"
    fi
    ((ok)) || pass=false
    printf '{"drill":"%s","write_outage_s":%s,"acked_rows_lost":%s,"final_leader":"%s","pass":%s,"duration_s":%s,%s"note":"%s","writer":%s}\n' \
        "$DRILL" "$outage" "$lost" "${DR_FINAL_LEADER:-}" "$pass" "$((($(now_ms) - DRILL_STARTED_MS) / 1000))" \
        "$extra" "$note" "${writer:-null}"
    [[ $pass == true ]]
}
