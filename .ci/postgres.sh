#!/usr/bin/env bash
# Throwaway PostgreSQL 15 cluster for txengine's tests.
#
#   bash .ci/postgres.sh start   # prints TXENGINE_TEST_POSTGRES_URL=... on stdout
#   bash .ci/postgres.sh stop    # stops the cluster and deletes its directory
#   bash .ci/postgres.sh status
#
# - Installs Debian's `postgresql` package if /usr/lib/postgresql/15/bin/initdb
#   is missing (needs root).
# - PostgreSQL refuses to run as root: when run as root, every server-side
#   command runs as the `postgres` user; otherwise as the calling user.
# - The cluster lives in /tmp/txengine-pg-XXXXXX (data/, sock/, postgres.log),
#   listens on 127.0.0.1 only, on a free port, with trust auth. Its location
#   is kept in the state file (default /tmp/txengine-pg.env, override with
#   TXENGINE_PG_STATE). The Debian default cluster (5432) is never touched.
# - Only the KEY=VALUE line goes to stdout; progress messages go to stderr.
set -euo pipefail

PGBIN=/usr/lib/postgresql/15/bin
STATE=${TXENGINE_PG_STATE:-/tmp/txengine-pg.env}
DB=txengine_test
DIR_PREFIX=/tmp/txengine-pg-

# Libpq environment variables would override or confuse the explicit options below.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGDATA PGPASSWORD \
      PGSSLMODE PGTARGETSESSIONATTRS 2>/dev/null || true
# Server-side commands never need the caller's cwd (which postgres may not be able to enter).
cd /

log() { echo "postgres.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    RUN_AS=postgres
else
    RUN_AS=$(id -un)
fi

# Run a command as the cluster owner.
as_pg() {
    if [ "$(id -u)" -ne 0 ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u postgres -- env HOME=/tmp "$@"
    else
        setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/tmp "$@"
    fi
}

ensure_installed() {
    if [ -x "$PGBIN/initdb" ]; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "$PGBIN/initdb missing and not root: cannot apt-get install postgresql"
    log "$PGBIN/initdb missing: installing Debian's postgresql package"
    local attempt
    for attempt in 1 2 3 4 5 6; do
        if apt-get -o DPkg::Lock::Timeout=60 update >&2 \
            && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 \
                   install -y postgresql >&2; then
            break
        fi
        [ "$attempt" -lt 6 ] || die "apt-get install postgresql failed $attempt times"
        log "apt-get failed (attempt $attempt; lock held?), retrying in 10s"
        sleep 10
    done
    [ -x "$PGBIN/initdb" ] || die "postgresql installed but $PGBIN/initdb still missing"
}

state_get() { # state_get KEY -> value from the state file (not sourced)
    [ -f "$STATE" ] || return 0
    sed -n "s/^$1=//p" "$STATE" | tail -n 1
}

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

is_running() { # is_running DIR
    [ -d "$1/data" ] && as_pg "$PGBIN/pg_ctl" -D "$1/data" status >/dev/null 2>&1
}

wait_ready() { # wait_ready PORT
    local i
    for i in $(seq 1 60); do
        if as_pg "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres; then
            return 0
        fi
        sleep 1
    done
    return 1
}

create_db() { # create_db PORT
    local exists
    exists=$(as_pg "$PGBIN/psql" -X -q -t -A -h 127.0.0.1 -p "$1" -U postgres -d postgres \
        -c "select 1 from pg_database where datname = '$DB'")
    if [ "$exists" != 1 ]; then
        as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$1" -U postgres "$DB"
    fi
}

url_for() { echo "postgresql+psycopg://postgres@127.0.0.1:$1/$DB"; }

remove_dir() { # remove_dir DIR (only our own /tmp/txengine-pg-* dirs)
    case "$1" in
        "$DIR_PREFIX"?*) rm -rf -- "$1" ;;
        *) log "refusing to delete unexpected directory '$1'" ;;
    esac
}

do_stop() {
    local dir
    dir=$(state_get TXENGINE_PG_DIR)
    if [ -z "$dir" ]; then
        log "no cluster recorded in $STATE: nothing to stop"
        rm -f -- "$STATE"
        return 0
    fi
    if is_running "$dir"; then
        log "stopping cluster in $dir"
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2 \
            || as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w -t 60 stop >&2 \
            || log "pg_ctl stop failed"
    fi
    remove_dir "$dir"
    rm -f -- "$STATE"
    log "stopped and removed $dir"
}

do_start() {
    local dir port

    # Already started (start called twice)? Reuse it if it is healthy.
    dir=$(state_get TXENGINE_PG_DIR)
    port=$(state_get TXENGINE_PG_PORT)
    if [ -n "$dir" ]; then
        if [ -n "$port" ] && is_running "$dir" && wait_ready "$port"; then
            log "reusing running cluster in $dir on port $port"
            create_db "$port"
            echo "TXENGINE_TEST_POSTGRES_URL=$(url_for "$port")"
            return 0
        fi
        log "stale state in $STATE: cleaning up"
        do_stop
    fi

    ensure_installed
    if [ "$RUN_AS" = postgres ] && ! id postgres >/dev/null 2>&1; then
        die "user 'postgres' does not exist (is the postgresql package installed?)"
    fi

    dir=$(mktemp -d "${DIR_PREFIX}XXXXXX")
    # Record it at once so that `stop` can clean up even if the rest fails.
    printf 'TXENGINE_PG_DIR=%s\n' "$dir" >"$STATE"
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed (exit $rc): cleaning up"; do_stop; fi' EXIT

    chmod 0755 "$dir"   # /tmp is 1777, so every parent is enterable
    mkdir -p "$dir/sock"
    [ "$(id -u)" -ne 0 ] || chown -R postgres:postgres "$dir"

    log "initdb in $dir/data"
    as_pg "$PGBIN/initdb" -D "$dir/data" --auth=trust -E UTF8 --locale=C.UTF-8 -U postgres >&2
    cat >>"$dir/data/postgresql.conf" <<EOF

# --- txengine CI (.ci/postgres.sh) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
EOF

    local attempt started=0
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        log "starting on 127.0.0.1:$port (attempt $attempt)"
        if as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -o "-p $port" \
                -w -t 60 start >&2; then
            started=1
            break
        fi
        log "pg_ctl start failed; last log lines:"
        tail -n 20 "$dir/postgres.log" >&2 2>/dev/null || true
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    done
    [ "$started" = 1 ] || die "could not start PostgreSQL"
    printf 'TXENGINE_PG_DIR=%s\nTXENGINE_PG_PORT=%s\nTXENGINE_TEST_POSTGRES_URL=%s\n' \
        "$dir" "$port" "$(url_for "$port")" >"$STATE"

    wait_ready "$port" || { tail -n 20 "$dir/postgres.log" >&2 || true; die "pg_isready never succeeded on port $port"; }
    create_db "$port"
    trap - EXIT
    log "PostgreSQL 15 ready: data in $dir, port $port, state in $STATE"
    echo "TXENGINE_TEST_POSTGRES_URL=$(url_for "$port")"
}

do_status() {
    local dir port
    dir=$(state_get TXENGINE_PG_DIR)
    port=$(state_get TXENGINE_PG_PORT)
    if [ -n "$dir" ] && [ -n "$port" ] && is_running "$dir"; then
        echo "running: dir=$dir port=$port"
        echo "TXENGINE_TEST_POSTGRES_URL=$(url_for "$port")"
    else
        echo "not running"
        return 3
    fi
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
