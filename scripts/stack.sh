#!/usr/bin/env bash
# Local PostgreSQL HA test stack for fastapi_rwdb, without Docker:
#   etcd (1 node) -> 3 x Patroni + PostgreSQL 15 (1 primary, 2 streaming replicas)
#   -> one PgBouncer per node -> HAProxy (write port = primary, read port = replicas);
#   and one Redis, for the job-queue recipes (Celery, arq) of docs/recipes.md.
# Everything listens on 127.0.0.1. Run `scripts/stack.sh help` for the sub-commands.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
TEMPLATE_DIR="$REPO_DIR/stack/templates"

STACK_DIR=${RWDB_STACK_DIR:-/var/tmp/rwdb-stack}
STACK_DIR=${STACK_DIR%/}
WRITE_PORT=${RWDB_STACK_WRITE_PORT:-5432}
READ_PORT=${RWDB_STACK_READ_PORT:-5433}
STATS_PORT=${RWDB_STACK_STATS_PORT:-7000}
REDIS_PORT=${RWDB_STACK_REDIS_PORT:-6380} # not 6379: a Redis of the machine's own may be there
UP_TIMEOUT=${RWDB_STACK_TIMEOUT:-120}
ETCD_CLIENT_PORT=2379
ETCD_PEER_PORT=2380
PG_BIN=/usr/lib/postgresql/15/bin
SCOPE=rwdb
NODES=(node1 node2 node3)

APP_USER=rwdb_app
APP_PASSWORD=rwdb_app_pw
APP_DB=rwdb
TEST_DB=rwdb_test # the test suite's own (post_bootstrap.sh creates both)
SUPER_USER=postgres
SUPER_PASSWORD=postgres_pw

if [[ $EUID -eq 0 ]]; then
    RUN_USER=${RWDB_STACK_USER:-rwdb}
    VENV=${RWDB_STACK_VENV:-/opt/rwdb-stack/venv}
else
    RUN_USER=$(id -un)
    if [[ -n ${RWDB_STACK_VENV:-} ]]; then
        VENV=$RWDB_STACK_VENV
    elif [[ -x /opt/rwdb-stack/venv/bin/patroni ]]; then
        VENV=/opt/rwdb-stack/venv
    else
        VENV=${XDG_DATA_HOME:-${HOME:-/tmp}/.local/share}/rwdb-stack/venv
    fi
fi
PATRONI_SPEC='patroni[psycopg3,etcd3]>=4,<5'
START_TS=$(date +%s.%N)

# ----------------------------------------------------------------------------- helpers

say() { printf '[stack %5.1fs] %s\n' "$(elapsed)" "$*"; }
warn() { printf '[stack] WARNING: %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v s="$START_TS" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
now() { date +%s.%N; }
since() { awk -v s="$1" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }

node_index() {
    case $1 in
        node1) echo 0 ;; node2) echo 1 ;; node3) echo 2 ;;
        *) die "unknown node '$1' (expected node1, node2 or node3)" ;;
    esac
}
pg_port() { echo $((15432 + $(node_index "$1"))); }
bouncer_port() { echo $((16432 + $(node_index "$1"))); }
rest_port() { echo $((18008 + $(node_index "$1"))); }
node_dir() { echo "$STACK_DIR/$1"; }
node_of_pg_port() {
    local n
    for n in "${NODES[@]}"; do [[ $(pg_port "$n") == "$1" ]] && { echo "$n"; return 0; }; done
    echo "?port=$1"
}

psql_bin() {
    if [[ -x $PG_BIN/psql ]]; then echo "$PG_BIN/psql"; else command -v psql || echo psql; fi
}

# conninfo for the app role on a given port
app_dsn() { echo "host=127.0.0.1 port=$1 user=$APP_USER password=$APP_PASSWORD dbname=$APP_DB connect_timeout=2"; }

# "f|15432" (in recovery?|server port) or nothing when the port does not answer
probe_sql() {
    "$(psql_bin)" -X -At -F'|' "$(app_dsn "$1")" \
        -c 'select pg_is_in_recovery(), inet_server_port()' 2>/dev/null || true
}

# --------------------------------------------------------------------------- processes

# alive = exists and is not a zombie (PID 1 here reaps slowly)
is_alive() {
    local pid=$1 stat
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    { stat=$(<"/proc/$pid/stat"); } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

# pid is alive and belongs to this stack (its command line names the stack dir).
# While a process is in execve its cmdline reads empty for a moment (a launch goes
# through setsid, bash, env and setpriv before the server): read again, briefly.
is_ours() {
    local cmd tries=0
    is_alive "$1" || return 1
    cmd=$(cmdline_of "$1")
    while [[ -z $cmd ]] && is_alive "$1" && ((tries < 50)); do
        sleep 0.01
        tries=$((tries + 1))
        cmd=$(cmdline_of "$1")
    done
    [[ $cmd == *"$STACK_DIR/"* ]]
}

# pid recorded in a pid file, if that process is still ours
pid_from() {
    local f=$1 pid
    [[ -r $f ]] || return 1
    pid=$(head -n1 "$f" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    is_ours "$pid" || return 1
    echo "$pid"
}

etcd_pid() { pid_from "$STACK_DIR/etcd/etcd.pid"; }
patroni_pid() { pid_from "$(node_dir "$1")/patroni.pid"; }
bouncer_pid() { pid_from "$(node_dir "$1")/pgbouncer.pid"; }
haproxy_pid() { pid_from "$STACK_DIR/haproxy/haproxy.pid"; }
redis_pid() { pid_from "$STACK_DIR/redis/redis.pid"; }
postmaster_pid() {
    local f pid
    f="$(node_dir "$1")/data/postmaster.pid"
    [[ -r $f ]] || return 1
    pid=$(head -n1 "$f" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" && [[ $(cmdline_of "$pid") == *"$(node_dir "$1")/data"* ]] || return 1
    echo "$pid"
}

children_of() {
    local parent=$1 f stat rest ppid
    for f in /proc/[0-9]*/stat; do
        { stat=$(<"$f"); } 2>/dev/null || continue
        rest=${stat##*) }
        read -r _ ppid _ <<<"$rest"
        [[ $ppid == "$parent" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
    return 0
}

# run a command as the unprivileged stack user with a clean environment
user_cmd() { "${USER_CMD_PREFIX[@]}" "$@"; }

# launch PIDFILE LOGFILE CMD... : start a daemon in its own session as the stack user
launch() {
    local pidfile=$1 logfile=$2; shift 2
    touch "$logfile" && own "$logfile"
    printf '\n==== %s start: %s\n' "$(date '+%F %T')" "$*" >>"$logfile"
    # The daemon keeps no descriptor but its output: one inherited from the caller
    # (say the lock of `flock /var/tmp/rwdb-tests.lock stack.sh up`) would be held as
    # long as the daemon runs, and every later flock on it would wait forever.
    setsid "$BASH" -c 'for fd in /proc/$$/fd/*; do fd=${fd##*/}; ((fd > 2)) && eval "exec $fd>&-"; done 2>/dev/null
        ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"' _ \
        "${USER_CMD_PREFIX[@]}" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    local pid=$! waited=0
    echo "$pid" >"$pidfile"
    own "$pidfile"
    # Until the child has exec'd, /proc/PID/cmdline is still this script's, so
    # is_ours (and every *_pid check) would call a starting process gone (CI once
    # died on "etcd exited during start-up" with an empty etcd log). Wait for the
    # first exec (well under a millisecond, longer on a loaded machine) or an exit.
    while is_alive "$pid" && ! is_ours "$pid" && ((waited < 500)); do
        sleep 0.01
        waited=$((waited + 1))
    done
}

# stop_pids TIMEOUT PID... : SIGTERM, wait, then SIGKILL; zombies count as exited
stop_pids() {
    local timeout=$1; shift
    local pid deadline left
    (($# == 0)) && return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    deadline=$(($(date +%s) + timeout))
    while :; do
        left=()
        for pid in "$@"; do is_alive "$pid" && left+=("$pid"); done
        ((${#left[@]} == 0)) && return 0
        (($(date +%s) >= deadline)) && break
        sleep 0.2
    done
    warn "pid(s) ${left[*]} still running after ${timeout}s: SIGKILL"
    for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    deadline=$(($(date +%s) + 10))
    for pid in "${left[@]}"; do
        while is_alive "$pid" && (($(date +%s) < deadline)); do sleep 0.1; done
    done
    return 0
}

kill_pids() { # SIGKILL and wait until gone (zombies count as gone)
    local pid deadline=$(($(date +%s) + 10))
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        while is_alive "$pid" && (($(date +%s) < deadline)); do sleep 0.05; done
    done
    return 0
}

own() { if [[ $EUID -eq 0 && $RUN_USER != root ]]; then chown "$RUN_USER:" "$@"; fi; }

# ------------------------------------------------------------------------------ ports

# "pid=123 (cmd...)" of whatever listens on TCP port $1, nothing if free
port_listeners() {
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
}

port_in_use() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# fail when a port is held by something that is not part of this stack
check_port_free() {
    local port=$1 what=$2 pid pids desc=
    port_in_use "$port" || return 0
    pids=$(port_listeners "$port")
    for pid in $pids; do is_ours "$pid" && return 0; done
    for pid in $pids; do desc+=" pid $pid ($(cmdline_of "$pid" | cut -c1-100))"; done
    [[ -n $desc ]] || desc=" a process this user cannot see (run as root to find it)"
    printf '[stack] %s\n' "$(ss -ltnp "sport = :$port" 2>/dev/null | tail -n +2)" >&2
    die "port 127.0.0.1:$port (needed for $what) is already in use by$desc. Stop it (HAProxy ports can be moved with RWDB_STACK_WRITE_PORT / RWDB_STACK_READ_PORT / RWDB_STACK_STATS_PORT)."
}

# --------------------------------------------------------------------------- install

missing_packages() {
    local -a pkgs=()
    [[ -x $PG_BIN/postgres && -x $PG_BIN/initdb && -x $PG_BIN/pg_rewind ]] || pkgs+=(postgresql-15)
    [[ -x $PG_BIN/psql || -x /usr/bin/psql ]] || pkgs+=(postgresql-client-15)
    command -v pgbouncer >/dev/null || pkgs+=(pgbouncer)
    command -v haproxy >/dev/null || pkgs+=(haproxy)
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || pkgs+=(redis-server)
    command -v etcd >/dev/null || pkgs+=(etcd-server)
    command -v etcdctl >/dev/null || pkgs+=(etcd-client)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v ss >/dev/null || pkgs+=(iproute2)
    command -v setpriv >/dev/null || pkgs+=(util-linux)
    [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
    echo "${pkgs[*]}"
}

venv_ok() { [[ -x $VENV/bin/patroni && -x $VENV/bin/patronictl && -f $VENV/.rwdb-stack-ok ]]; }

need_install() { [[ -n $(missing_packages) ]] || ! venv_ok; }

cmd_install() {
    local pkgs policy_created=0 svc
    pkgs=$(missing_packages)
    if [[ -n $pkgs ]]; then
        if [[ $EUID -ne 0 ]]; then
            die "missing Debian packages: $pkgs. Install them as root (sudo apt-get install $pkgs, or sudo $0 install)."
        fi
        say "apt-get install $pkgs"
        # keep the packages' own services from starting (they would hold our ports)
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
            policy_created=1
        fi
        local rc=0
        {
            DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs
        } >/tmp/rwdb-stack-apt.log 2>&1 || rc=$?
        ((policy_created)) && rm -f /usr/sbin/policy-rc.d
        if ((rc != 0)); then
            tail -n 30 /tmp/rwdb-stack-apt.log >&2
            die "apt-get install failed (full log: /tmp/rwdb-stack-apt.log)"
        fi
        # services of packages we just installed: stop and disable them
        for svc in etcd haproxy pgbouncer postgresql redis-server; do
            case "$svc:$pkgs" in
                etcd:*etcd-server* | haproxy:*haproxy* | pgbouncer:*pgbouncer* | postgresql:*postgresql-15*) ;;
                redis-server:*redis-server*) ;;
                *) continue ;;
            esac
            if [[ -d /run/systemd/system ]]; then
                systemctl disable --now "$svc" >/dev/null 2>&1 || true
            else
                service "$svc" stop >/dev/null 2>&1 || true
            fi
        done
        pkgs=$(missing_packages)
        [[ -z $pkgs ]] || die "still missing after apt-get: $pkgs"
    fi
    if ! venv_ok; then
        say "creating Patroni venv $VENV ($PATRONI_SPEC)"
        local parent
        parent=$(dirname "$VENV")
        mkdir -p "$parent" 2>/dev/null || die "cannot create $parent (set RWDB_STACK_VENV to a writable path or run as root)"
        (
            umask 022
            if [[ -e $VENV && ! -f $VENV/pyvenv.cfg ]]; then
                echo "$VENV exists and is not a venv; not touching it"
                exit 1
            fi
            rm -rf "$VENV"
            /usr/bin/python3 -m venv "$VENV"
            "$VENV/bin/pip" install -q --disable-pip-version-check "$PATRONI_SPEC"
        ) >/tmp/rwdb-stack-pip.$EUID.log 2>&1 || {
            tail -n 30 /tmp/rwdb-stack-pip.$EUID.log >&2
            die "pip install of $PATRONI_SPEC into $VENV failed"
        }
        touch "$VENV/.rwdb-stack-ok"
    fi
    say "installed: $("$PG_BIN/postgres" --version), $("$VENV/bin/patroni" --version), $(pgbouncer --version | head -n1), $(haproxy -v | head -n1 | cut -d' ' -f1-3), etcd $(etcd --version | awk 'NR==1 {print $3}'), $(redis-server --version | cut -d' ' -f1-3)"
}

ensure_installed() {
    if need_install; then cmd_install; fi
}

# ------------------------------------------------------------------------ configuration

render() { # render TEMPLATE OUT KEY=VALUE...
    local name=$1 tpl="$TEMPLATE_DIR/$1" out=$2 kv content left
    shift 2
    [[ -r $tpl ]] || die "template $tpl not found"
    content=$(<"$tpl")
    for kv in "$@"; do content=${content//"@${kv%%=*}@"/"${kv#*=}"}; done
    left=$(grep -o '@[A-Z][A-Z0-9_]*@' <<<"$content" | sort -u | tr '\n' ' ' || true)
    [[ -z $left ]] || die "unrendered placeholders in template $name: $left"
    printf '%s\n' "$content" >"$out.tmp"
    mv -f "$out.tmp" "$out"
}

ensure_user() {
    [[ $EUID -eq 0 && $RUN_USER != root ]] || return 0
    id "$RUN_USER" >/dev/null 2>&1 && return 0
    say "creating system user $RUN_USER"
    useradd --system --user-group --no-create-home --home-dir "$STACK_DIR" \
        --shell /usr/sbin/nologin "$RUN_USER" || die "useradd $RUN_USER failed"
}

prepare() {
    local n d
    ensure_user
    mkdir -p "$STACK_DIR"
    own "$STACK_DIR"
    chmod 755 "$STACK_DIR"
    user_cmd test -w "$STACK_DIR" || die "$STACK_DIR is not writable by $RUN_USER (choose another RWDB_STACK_DIR)"
    touch "$STACK_DIR/.rwdb-stack" && own "$STACK_DIR/.rwdb-stack"
    mkdir -p "$STACK_DIR/etcd" "$STACK_DIR/haproxy" "$STACK_DIR/redis"
    own "$STACK_DIR/etcd" "$STACK_DIR/haproxy" "$STACK_DIR/redis"

    render post_bootstrap.sh "$STACK_DIR/post_bootstrap.sh" "PSQL=$(psql_bin)"
    chmod 755 "$STACK_DIR/post_bootstrap.sh" && own "$STACK_DIR/post_bootstrap.sh"

    for n in "${NODES[@]}"; do
        d=$(node_dir "$n")
        mkdir -p "$d/run" "$d/log"
        own "$d" "$d/run" "$d/log"
        chmod 700 "$d/run"
        render patroni.yml "$d/patroni.yml" \
            "NODE=$n" \
            "REST_LISTEN=127.0.0.1:$(rest_port "$n")" "REST_CONNECT=127.0.0.1:$(rest_port "$n")" \
            "ETCD_HOSTS=127.0.0.1:$ETCD_CLIENT_PORT" \
            "POST_BOOTSTRAP=$STACK_DIR/post_bootstrap.sh" \
            "PG_LISTEN=127.0.0.1:$(pg_port "$n")" "PG_CONNECT=127.0.0.1:$(pg_port "$n")" \
            "DATA_DIR=$d/data" "BIN_DIR=$PG_BIN" "PGPASS=$d/pgpass" \
            "SOCKET_DIR=$d/run" "LOG_DIR=$d/log" "HBA_ADDR=127.0.0.1/32"
        render pgbouncer.ini "$d/pgbouncer.ini" \
            "NODE=$n" "PG_HOST=127.0.0.1" "PG_PORT=$(pg_port "$n")" \
            "LISTEN_ADDR=127.0.0.1" "LISTEN_PORT=$(bouncer_port "$n")" \
            "SOCKET_DIR=$d/run" "AUTH_FILE=$d/userlist.txt"
        printf '"%s" "%s"\n"%s" "%s"\n' "$APP_USER" "$APP_PASSWORD" "$SUPER_USER" "$SUPER_PASSWORD" >"$d/userlist.txt"
        chmod 600 "$d/patroni.yml" "$d/pgbouncer.ini" "$d/userlist.txt"
        own "$d/patroni.yml" "$d/pgbouncer.ini" "$d/userlist.txt"
    done
    render haproxy.cfg "$STACK_DIR/haproxy/haproxy.cfg" \
        "BIND_ADDR=127.0.0.1" "WRITE_PORT=$WRITE_PORT" "READ_PORT=$READ_PORT" "STATS_PORT=$STATS_PORT" \
        "NODE1_HOST=127.0.0.1" "NODE2_HOST=127.0.0.1" "NODE3_HOST=127.0.0.1"
    own "$STACK_DIR/haproxy/haproxy.cfg"
    render redis.conf "$STACK_DIR/redis/redis.conf" \
        "BIND_ADDR=127.0.0.1" "PORT=$REDIS_PORT" "DATA_DIR=$STACK_DIR/redis"
    own "$STACK_DIR/redis/redis.conf"
}

# ------------------------------------------------------------------------------ starting

USER_CMD_PREFIX=()
init_user_prefix() {
    USER_CMD_PREFIX=(env -i "HOME=$STACK_DIR" "USER=$RUN_USER" "LOGNAME=$RUN_USER" "LANG=C.UTF-8" "LC_ALL=C.UTF-8"
        "PATH=$VENV/bin:$PG_BIN:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    if [[ $EUID -eq 0 && $RUN_USER != root ]]; then
        USER_CMD_PREFIX+=(setpriv "--reuid=$RUN_USER" "--regid=$RUN_USER" --init-groups --)
    fi
}
init_user_prefix

etcdctl_() { ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$ETCD_CLIENT_PORT" --command-timeout=2s "$@"; }

etcd_healthy() { curl -fsS --max-time 1 "http://127.0.0.1:$ETCD_CLIENT_PORT/health" 2>/dev/null | grep -q '"health":"true"'; }

start_etcd() {
    if etcd_pid >/dev/null; then return 0; fi
    local d="$STACK_DIR/etcd"
    mkdir -p "$d/data" && own "$d/data" && chmod 700 "$d/data"
    say "starting etcd on 127.0.0.1:$ETCD_CLIENT_PORT"
    launch "$d/etcd.pid" "$d/etcd.log" etcd --name rwdb-etcd --data-dir "$d/data" --logger zap \
        --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "rwdb-etcd=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-state new --auto-compaction-retention 1
    local deadline=$(($(date +%s) + 30))
    until etcd_healthy; do
        etcd_pid >/dev/null || { tail_logs "$d/etcd.log"; die "etcd exited during start-up"; }
        (($(date +%s) < deadline)) || { tail_logs "$d/etcd.log"; die "etcd not healthy after 30s"; }
        sleep 0.1
    done
}

start_patroni() {
    local n=$1 d
    d=$(node_dir "$n")
    patroni_pid "$n" >/dev/null && return 0
    say "starting Patroni $n (PostgreSQL 127.0.0.1:$(pg_port "$n"), REST 127.0.0.1:$(rest_port "$n"))"
    launch "$d/patroni.pid" "$d/patroni.log" "$VENV/bin/patroni" "$d/patroni.yml"
}

start_bouncer() {
    local n=$1 d
    d=$(node_dir "$n")
    bouncer_pid "$n" >/dev/null && return 0
    say "starting PgBouncer $n on 127.0.0.1:$(bouncer_port "$n")"
    launch "$d/pgbouncer.pid" "$d/pgbouncer.log" pgbouncer "$d/pgbouncer.ini"
}

start_haproxy() {
    haproxy_pid >/dev/null && return 0
    local d="$STACK_DIR/haproxy"
    haproxy -c -q -f "$d/haproxy.cfg" >/dev/null 2>"$d/check.err" || { cat "$d/check.err" >&2; die "invalid $d/haproxy.cfg"; }
    say "starting HAProxy (write 127.0.0.1:$WRITE_PORT, read 127.0.0.1:$READ_PORT, stats http://127.0.0.1:$STATS_PORT/)"
    launch "$d/haproxy.pid" "$d/haproxy.log" haproxy -f "$d/haproxy.cfg"
}

redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

start_redis() {
    redis_pid >/dev/null && return 0
    local d="$STACK_DIR/redis"
    say "starting Redis on 127.0.0.1:$REDIS_PORT"
    launch "$d/redis.pid" "$d/redis.log" redis-server "$d/redis.conf"
    local deadline=$(($(date +%s) + 30))
    until redis_ping; do
        redis_pid >/dev/null || { tail_logs "$d/redis.log"; die "Redis exited during start-up"; }
        (($(date +%s) < deadline)) || { tail_logs "$d/redis.log"; die "Redis not answering PING after 30s"; }
        sleep 0.1
    done
}

has_data() { [[ -f "$(node_dir "$1")/data/PG_VERSION" ]]; }

rest_get_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$(rest_port "$1")$2" 2>/dev/null || true; }

# JSON of GET /cluster from the first Patroni that answers
cluster_json() {
    local n out
    for n in "${NODES[@]}"; do
        out=$(curl -fsS --max-time 1 "http://127.0.0.1:$(rest_port "$n")/cluster" 2>/dev/null) && [[ -n $out ]] && {
            echo "$out"
            return 0
        }
    done
    return 1
}

# lines "name role state lag timeline"
members() {
    local j
    j=$(cluster_json) || return 1
    /usr/bin/python3 -c '
import json, sys
for m in json.loads(sys.argv[1]).get("members", []):
    lag = m.get("lag", m.get("receive_lag", "-"))
    print(m.get("name"), m.get("role", "-"), m.get("state", "-"), lag if lag not in (None, "") else "-", m.get("timeline", "-"))
' "$j"
}

leader_name() { members 2>/dev/null | awk '$2 == "leader" && $3 == "running" { print $1; exit }'; }

# ------------------------------------------------------------------------------ readiness

READY_MISSING=()
check_ready() {
    READY_MISSING=()
    local n m w r leaders=0 streaming=0
    etcd_pid >/dev/null || READY_MISSING+=("etcd is not running")
    for n in "${NODES[@]}"; do
        patroni_pid "$n" >/dev/null || READY_MISSING+=("Patroni $n is not running")
        bouncer_pid "$n" >/dev/null || READY_MISSING+=("PgBouncer $n is not running")
    done
    haproxy_pid >/dev/null || READY_MISSING+=("HAProxy is not running")
    if ! redis_pid >/dev/null; then
        READY_MISSING+=("Redis is not running")
    elif ! redis_ping; then
        READY_MISSING+=("Redis 127.0.0.1:$REDIS_PORT does not answer PING")
    fi
    if m=$(members 2>/dev/null); then
        leaders=$(awk '$2 == "leader" && $3 == "running"' <<<"$m" | wc -l)
        streaming=$(awk '$2 != "leader" && $3 == "streaming"' <<<"$m" | wc -l)
        ((leaders == 1)) || READY_MISSING+=("no running Patroni leader")
        ((streaming >= 2)) || READY_MISSING+=("$streaming/2 replicas streaming ($(awk '$2 != "leader" {printf "%s=%s ", $1, $3}' <<<"$m"))")
    else
        READY_MISSING+=("Patroni REST API (GET /cluster) not answering")
    fi
    w=$(probe_sql "$WRITE_PORT")
    [[ $w == f\|* ]] || READY_MISSING+=("write port $WRITE_PORT does not reach a primary (${w:-no answer})")
    r=$(probe_sql "$READ_PORT")
    [[ $r == t\|* ]] || READY_MISSING+=("read port $READ_PORT does not reach a replica (${r:-no answer})")
    ((${#READY_MISSING[@]} == 0))
}

tail_logs() {
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        printf '\n----- %s (last 25 lines) -----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

all_logs() {
    local n d
    echo "$STACK_DIR/etcd/etcd.log"
    for n in "${NODES[@]}"; do
        d=$(node_dir "$n")
        echo "$d/patroni.log" "$d/log/postgresql.log" "$d/pgbouncer.log"
    done
    echo "$STACK_DIR/haproxy/haproxy.log"
    echo "$STACK_DIR/redis/redis.log"
}

wait_ready() {
    local timeout=$1 deadline
    deadline=$(($(date +%s) + timeout))
    local last=
    while ! check_ready; do
        if [[ "${READY_MISSING[*]}" != "$last" ]]; then
            last="${READY_MISSING[*]}"
            say "  waiting for: $(IFS=';'; echo "${READY_MISSING[*]}" | sed 's/;/; /g')"
        fi
        if (($(date +%s) >= deadline)); then
            printf '[stack] not ready after %ss; missing:\n' "$timeout" >&2
            printf '  - %s\n' "${READY_MISSING[@]}" >&2
            # shellcheck disable=SC2046
            tail_logs $(all_logs)
            die "stack is not ready (what started is left running: see '$0 status', logs in $STACK_DIR; '$0 down --wipe' to clean up)"
        fi
        sleep 0.3
    done
}

wait_leader() { # wait_leader TIMEOUT [NODE] -> prints leader
    local timeout=$1 want=${2:-} deadline l
    deadline=$(($(date +%s) + timeout))
    while :; do
        if [[ -n $want ]]; then
            [[ $(rest_get_code "$want" /primary) == 200 ]] && { echo "$want"; return 0; }
        else
            l=$(leader_name || true)
            [[ -n $l ]] && { echo "$l"; return 0; }
        fi
        (($(date +%s) < deadline)) || return 1
        sleep 0.2
    done
}

# The role and databases of post_bootstrap.sh, on a cluster made before one of them was
# added there too (Patroni runs that hook only when it bootstraps a new cluster).
ensure_databases() {
    local primary
    primary=$(probe_sql "$WRITE_PORT" | cut -d'|' -f2)
    [[ -n $primary ]] || die "the write port $WRITE_PORT does not answer: cannot create the databases"
    PGPASSWORD=$SUPER_PASSWORD PGCONNECT_TIMEOUT=5 PGOPTIONS="-c client_min_messages=warning" \
        "$STACK_DIR/post_bootstrap.sh" \
        "host=127.0.0.1 port=$primary user=$SUPER_USER dbname=postgres" \
        || die "creating the databases $APP_DB and $TEST_DB on $(node_of_pg_port "$primary") failed"
}

# --------------------------------------------------------------------------- sub-commands

cmd_up() {
    ensure_installed
    prepare
    if check_ready; then
        ensure_databases
        say "already up and healthy: write 127.0.0.1:$WRITE_PORT -> $(node_of_pg_port "$(probe_sql "$WRITE_PORT" | cut -d'|' -f2)"), read 127.0.0.1:$READ_PORT"
        return 0
    fi

    # every port we are about to bind must be free or already ours
    local n
    etcd_pid >/dev/null || {
        check_port_free "$ETCD_CLIENT_PORT" "etcd client"
        check_port_free "$ETCD_PEER_PORT" "etcd peer"
    }
    for n in "${NODES[@]}"; do
        if ! patroni_pid "$n" >/dev/null; then
            check_port_free "$(pg_port "$n")" "PostgreSQL $n"
            check_port_free "$(rest_port "$n")" "Patroni REST $n"
        fi
        bouncer_pid "$n" >/dev/null || check_port_free "$(bouncer_port "$n")" "PgBouncer $n"
    done
    haproxy_pid >/dev/null || {
        check_port_free "$WRITE_PORT" "HAProxy write"
        check_port_free "$READ_PORT" "HAProxy read"
        check_port_free "$STATS_PORT" "HAProxy stats"
    }
    redis_pid >/dev/null || check_port_free "$REDIS_PORT" "Redis"

    local fresh=1
    for n in "${NODES[@]}"; do has_data "$n" && fresh=0; done
    if ((fresh)) && ! etcd_pid >/dev/null; then
        rm -rf "$STACK_DIR/etcd/data" # a new cluster: forget any old cluster state
    fi
    start_etcd
    if ((fresh)); then
        # node data gone but etcd may still know an old cluster: drop its keys
        etcdctl_ del --prefix "/service/$SCOPE/" >/dev/null 2>&1 || true
    fi
    for n in "${NODES[@]}"; do start_bouncer "$n"; done
    start_haproxy
    start_redis

    local first=node1 running=0
    for n in "${NODES[@]}"; do patroni_pid "$n" >/dev/null && running=1; done
    if ((!fresh)) && [[ -r $STACK_DIR/last_leader ]]; then
        first=$(<"$STACK_DIR/last_leader")
        [[ " ${NODES[*]} " == *" $first "* ]] || first=node1
    fi
    if ! has_data "$first"; then
        for n in "${NODES[@]}"; do has_data "$n" && { first=$n; break; }; done
    fi
    if ((fresh)); then
        start_patroni node1
        say "waiting for node1 to bootstrap the cluster and become the leader"
        if ! wait_leader 60 node1 >/dev/null; then
            tail_logs "$(node_dir node1)/patroni.log" "$(node_dir node1)/log/postgresql.log"
            die "node1 did not become the leader within 60s"
        fi
        say "node1 is the leader"
    elif ((!running)); then
        start_patroni "$first"
        say "waiting for a leader (starting with $first, the last leader)"
        local l
        if l=$(wait_leader 25); then say "$l is the leader"; else warn "no leader yet; starting the other nodes"; fi
    fi
    for n in "${NODES[@]}"; do start_patroni "$n"; done

    say "waiting until write/read ports and both replicas are ready (timeout ${UP_TIMEOUT}s)"
    wait_ready "$UP_TIMEOUT"
    ensure_databases
    say "stack is up: write 127.0.0.1:$WRITE_PORT -> $(node_of_pg_port "$(probe_sql "$WRITE_PORT" | cut -d'|' -f2)"), read 127.0.0.1:$READ_PORT, stats http://127.0.0.1:$STATS_PORT/"
}

stop_node_processes() { # graceful stop of Patroni (+ its PostgreSQL) of the given nodes, in parallel
    local n pids=() pm
    for n in "$@"; do
        local p
        p=$(patroni_pid "$n") && pids+=("$p")
    done
    stop_pids 40 "${pids[@]}"
    # PostgreSQL left behind (Patroni killed or already dead): fast shutdown, then SIGKILL
    for n in "$@"; do
        if pm=$(postmaster_pid "$n"); then
            say "stopping orphaned PostgreSQL of $n (pid $pm)"
            local kids
            kids=$(children_of "$pm")
            kill -INT "$pm" 2>/dev/null || true
            local deadline=$(($(date +%s) + 15))
            while is_alive "$pm" && (($(date +%s) < deadline)); do sleep 0.2; done
            if is_alive "$pm"; then
                # shellcheck disable=SC2086
                kill_pids "$pm" $kids
            fi
        fi
    done
    return 0
}

cmd_down() {
    local wipe=0 a
    for a in "$@"; do
        case $a in
            --wipe) wipe=1 ;;
            *) die "usage: $0 down [--wipe]" ;;
        esac
    done
    say "stopping stack in $STACK_DIR"
    local leader n p replicas=()
    leader=$(leader_name 2>/dev/null || true)
    [[ -n $leader && -d $STACK_DIR ]] && { echo "$leader" >"$STACK_DIR/last_leader"; own "$STACK_DIR/last_leader"; }

    p=$(haproxy_pid) && stop_pids 10 "$p"
    p=$(redis_pid) && stop_pids 10 "$p"
    local bpids=()
    for n in "${NODES[@]}"; do p=$(bouncer_pid "$n") && bpids+=("$p"); done
    stop_pids 10 "${bpids[@]}"
    if ((wipe)); then
        stop_node_processes "${NODES[@]}" # data goes anyway: all at once
    else
        # replicas first, the leader last (no failover while shutting down)
        for n in "${NODES[@]}"; do [[ $n == "$leader" ]] || replicas+=("$n"); done
        stop_node_processes "${replicas[@]}"
        [[ -n $leader ]] && stop_node_processes "$leader"
    fi
    p=$(etcd_pid) && stop_pids 10 "$p"

    # any other stack daemon still around (pid file lost, crashed run, ...): stop it too
    local stray=() f pid comm
    for f in /proc/[0-9]*; do
        pid=${f#/proc/}
        { comm=$(<"$f/comm"); } 2>/dev/null || continue
        case $comm in etcd | patroni | pgbouncer | haproxy | redis-server | postgres | pg_basebackup | pg_rewind) ;; *) continue ;; esac
        [[ $(stat -c %U "$f" 2>/dev/null) == "$RUN_USER" ]] || continue
        is_ours "$pid" && stray+=("$pid")
    done
    if ((${#stray[@]})); then
        say "stopping leftover processes: ${stray[*]}"
        stop_pids 5 "${stray[@]}"
    fi

    if ((wipe)); then
        say "wiping data in $STACK_DIR"
        for n in "${NODES[@]}"; do rm -rf "${STACK_DIR:?}/$n"; done
        rm -rf "${STACK_DIR:?}/etcd" "${STACK_DIR:?}/haproxy" "${STACK_DIR:?}/redis" "${STACK_DIR:?}/post_bootstrap.sh" \
            "${STACK_DIR:?}/last_leader" "${STACK_DIR:?}/.rwdb-stack"
        rmdir "$STACK_DIR" 2>/dev/null || true
    fi
    say "stack is down"
}

patronictl_() { "$VENV/bin/patronictl" -c "$(node_dir node1)/patroni.yml" "$@"; }

# "node (primary|replica)" behind a HAProxy port, from a fresh connection
behind() {
    local r
    r=$(probe_sql "$1")
    [[ -n $r ]] || { echo "no answer"; return 0; }
    case ${r%%|*} in
        f) echo "$(node_of_pg_port "${r#*|}") (primary)" ;;
        t) echo "$(node_of_pg_port "${r#*|}") (replica)" ;;
        *) echo "$r" ;;
    esac
}

haproxy_up_servers() { # BACKEND -> "node1 node2_primary(backup)"
    curl -fsS --max-time 1 "http://127.0.0.1:$STATS_PORT/;csv" 2>/dev/null |
        awk -F, -v b="$1" '$1 == b && $2 != "FRONTEND" && $2 != "BACKEND" && $18 ~ /^UP/ { printf "%s ", $2 }'
}

cmd_status() {
    local n p
    echo "stack dir: $STACK_DIR (user $RUN_USER)"
    if p=$(etcd_pid); then echo "etcd:      up (pid $p) 127.0.0.1:$ETCD_CLIENT_PORT$(etcd_healthy && echo ', healthy' || echo ', NOT healthy')"; else echo "etcd:      DOWN"; fi
    echo
    if [[ -x $VENV/bin/patronictl && -r $(node_dir node1)/patroni.yml ]] && etcd_pid >/dev/null; then
        patronictl_ list 2>&1 || true
    else
        echo "(patronictl list unavailable: etcd down or stack not set up)"
    fi
    echo
    for n in "${NODES[@]}"; do
        local pat bnc
        if p=$(patroni_pid "$n"); then pat="up (pid $p)"; else pat=DOWN; fi
        if p=$(bouncer_pid "$n"); then bnc="up (pid $p)"; else bnc=DOWN; fi
        printf '%s: patroni %-16s pgbouncer 127.0.0.1:%s %s\n' "$n" "$pat" "$(bouncer_port "$n")" "$bnc"
    done
    echo
    if p=$(haproxy_pid); then
        echo "haproxy: up (pid $p), stats http://127.0.0.1:$STATS_PORT/"
        printf '  write 127.0.0.1:%s -> %-20s [servers UP: %s]\n' "$WRITE_PORT" "$(behind "$WRITE_PORT")" "$(haproxy_up_servers rwdb_write)"
        printf '  read  127.0.0.1:%s -> %-20s [servers UP: %s]\n' "$READ_PORT" "$(behind "$READ_PORT")" "$(haproxy_up_servers rwdb_read)"
    else
        echo "haproxy: DOWN"
    fi
    if p=$(redis_pid); then
        echo "redis:   up (pid $p) 127.0.0.1:$REDIS_PORT$(redis_ping && echo ', answers PING' || echo ', NOT answering')"
    else
        echo "redis:   DOWN"
    fi
    if check_ready; then echo "ready: yes"; else
        echo "ready: no"
        printf '  - %s\n' "${READY_MISSING[@]}"
        return 1
    fi
}

# milliseconds -> the form SHOW prints for an ms GUC (1000 -> 1s, 1500 -> 1500ms, 0 -> 0)
ms_to_show() {
    local ms=$1
    if ((ms == 0)); then echo 0
    elif ((ms % 86400000 == 0)); then echo "$((ms / 86400000))d"
    elif ((ms % 3600000 == 0)); then echo "$((ms / 3600000))h"
    elif ((ms % 60000 == 0)); then echo "$((ms / 60000))min"
    elif ((ms % 1000 == 0)); then echo "$((ms / 1000))s"
    else echo "${ms}ms"; fi
}

to_ms() { # 1s / 200ms / 1000 / 1.5s / 2min -> integer ms (empty if invalid)
    local v=${1// /}
    [[ $v =~ ^([0-9]+(\.[0-9]+)?)(us|ms|s|min|h|d)?$ ]] || return 1
    awk -v n="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]:-ms}" 'BEGIN {
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "min") ? 60000 : (u == "h") ? 3600000 : 86400000
        printf "%d", n * f + 0.5 }'
}

cmd_lag() {
    (($# == 1)) || die "usage: $0 lag <delay>   (e.g. 1s, 200ms, 1000 = ms, 0 = off)"
    local ms show json
    case $1 in off | none | reset) ms=0 ;; *) ms=$(to_ms "$1") || die "invalid delay '$1' (examples: 1s, 200ms, 1000, 0)" ;; esac
    ((ms <= 2147483647)) || die "delay too large"
    show=$(ms_to_show "$ms")
    if ((ms == 0)); then json=null; else json="\"$show\""; fi
    local n ok=0
    for n in "${NODES[@]}"; do
        if curl -fsS --max-time 5 -X PATCH -H 'Content-Type: application/json' \
            -d "{\"postgresql\":{\"parameters\":{\"recovery_min_apply_delay\":$json}}}" \
            "http://127.0.0.1:$(rest_port "$n")/config" >/dev/null 2>&1; then
            ok=1
            break
        fi
    done
    ((ok)) || die "no Patroni REST API answered PATCH /config (is the stack up?)"
    say "recovery_min_apply_delay = $show set in Patroni's dynamic config; waiting for the replicas"
    local deadline=$(($(date +%s) + 60)) m replicas v pending
    while :; do
        pending=()
        m=$(members 2>/dev/null || true)
        replicas=$(awk '$2 != "leader" && ($3 == "streaming" || $3 == "running") { print $1 }' <<<"$m")
        [[ -n $replicas ]] || pending+=("no running replica")
        for n in $replicas; do
            v=$("$(psql_bin)" -X -At "$(app_dsn "$(pg_port "$n")")" -c 'SHOW recovery_min_apply_delay' 2>/dev/null || true)
            [[ $v == "$show" ]] || pending+=("$n=${v:-?}")
        done
        if ((${#pending[@]} == 0)); then
            say "all replicas report recovery_min_apply_delay = $show ($(echo $replicas))"
            return 0
        fi
        (($(date +%s) < deadline)) || die "replicas did not pick up recovery_min_apply_delay=$show within 60s: ${pending[*]}"
        sleep 0.2
    done
}

cmd_switchover() {
    local m old new=${1:-} t0 l
    m=$(members) || die "Patroni REST API not answering (is the stack up?)"
    old=$(awk '$2 == "leader" && $3 == "running" { print $1; exit }' <<<"$m")
    [[ -n $old ]] || die "no running leader to switch over from"
    if [[ -z $new ]]; then
        new=$(awk '$2 != "leader" && $3 == "streaming" { print $1 }' <<<"$m" | sort | head -n1)
        [[ -n $new ]] || die "no streaming replica to switch over to"
    fi
    node_index "$new" >/dev/null
    [[ $new != "$old" ]] || die "$new is already the primary"
    say "switchover: $old -> $new (patronictl switchover --force)"
    t0=$(now)
    local out pctl rc=0
    out=$(mktemp)
    patronictl_ switchover "$SCOPE" --leader "$old" --candidate "$new" --force >"$out" 2>&1 &
    pctl=$!
    # poll the write port meanwhile: how long is there no writable primary behind it?
    local deadline=$(($(date +%s) + 120)) w r st last_old="" first_new="" pdone=0
    while :; do
        w=$(probe_sql "$WRITE_PORT")
        if [[ -z $first_new ]]; then
            if [[ $w == "f|$(pg_port "$old")" ]]; then
                last_old=$(now)
            elif [[ $w == "f|$(pg_port "$new")" ]]; then
                first_new=$(now)
                say "write port 127.0.0.1:$WRITE_PORT reaches $new (primary) after $(since "$t0")s"
            fi
        fi
        if ((!pdone)) && ! kill -0 "$pctl" 2>/dev/null; then
            wait "$pctl" || rc=$?
            pdone=1
            grep -E 'Success|[Ff]ail|[Ee]rror' "$out" | sed 's/^ */    patronictl: /' || true
            if ((rc != 0)); then
                cat "$out" >&2
                rm -f "$out"
                die "patronictl switchover failed (exit $rc)"
            fi
        fi
        if ((pdone)) && [[ -n $first_new ]]; then
            r=$(probe_sql "$READ_PORT")
            st=$(members 2>/dev/null | awk -v o="$old" '$1 == o { print $2 "/" $3 }')
            [[ $r == t\|* && $st == */streaming && $st != leader/* ]] && break
        fi
        if (($(date +%s) >= deadline)); then
            rm -f "$out"
            die "switchover not settled after 120s: write=${w:-none} read=${r:-none} $old=${st:-unknown}"
        fi
        sleep 0.1
    done
    rm -f "$out"
    local window="?"
    [[ -n $last_old ]] && window=$(awk -v a="$last_old" -v b="$first_new" 'BEGIN { printf "%.1f", b - a }')
    say "switchover done in $(since "$t0")s: old primary $old (now a streaming replica), new primary $new; write port had no primary for ~${window}s"
}

cmd_stop_node() {
    (($# == 1)) || die "usage: $0 stop-node NODE"
    node_index "$1" >/dev/null
    local was
    was=$(leader_name 2>/dev/null || true)
    if ! patroni_pid "$1" >/dev/null && ! postmaster_pid "$1" >/dev/null; then
        say "$1 is not running"
        return 0
    fi
    say "stopping Patroni + PostgreSQL of $1$([[ $was == "$1" ]] && echo ' (the primary)')"
    stop_node_processes "$1"
    say "$1 stopped"
}

cmd_kill_node() {
    (($# == 1)) || die "usage: $0 kill-node NODE"
    node_index "$1" >/dev/null
    local pids=() p pm was
    was=$(leader_name 2>/dev/null || true)
    if p=$(patroni_pid "$1"); then
        pids+=("$p")
        # shellcheck disable=SC2207
        pids+=($(children_of "$p"))
    fi
    if pm=$(postmaster_pid "$1"); then
        pids+=("$pm")
        # shellcheck disable=SC2207
        pids+=($(children_of "$pm"))
    fi
    ((${#pids[@]})) || { say "$1 is not running"; return 0; }
    # SIGSTOP first so nothing restarts in between, then SIGKILL everything at once
    kill -STOP "${pids[@]}" 2>/dev/null || true
    kill_pids "${pids[@]}"
    say "killed $1 (SIGKILL Patroni + PostgreSQL, pids ${pids[*]})$([[ $was == "$1" ]] && echo "; it was the primary: failover after the leader key expires (ttl 20s)")"
}

cmd_start_node() {
    (($# == 1)) || die "usage: $0 start-node NODE"
    local n=$1 t0
    node_index "$n" >/dev/null
    ensure_installed
    etcd_pid >/dev/null || die "etcd is not running: use '$0 up'"
    prepare
    t0=$(now)
    if ! patroni_pid "$n" >/dev/null; then
        postmaster_pid "$n" >/dev/null || check_port_free "$(pg_port "$n")" "PostgreSQL $n"
        check_port_free "$(rest_port "$n")" "Patroni REST $n"
    fi
    bouncer_pid "$n" >/dev/null || check_port_free "$(bouncer_port "$n")" "PgBouncer $n"
    start_bouncer "$n"
    start_patroni "$n"
    local deadline=$(($(date +%s) + UP_TIMEOUT)) st
    while :; do
        st=$(members 2>/dev/null | awk -v o="$n" '$1 == o { print $2 "/" $3 }')
        [[ $st == leader/running || $st == */streaming ]] && break
        if ! patroni_pid "$n" >/dev/null || (($(date +%s) >= deadline)); then
            tail_logs "$(node_dir "$n")/patroni.log" "$(node_dir "$n")/log/postgresql.log"
            die "$n did not come up (state: ${st:-unknown})"
        fi
        sleep 0.3
    done
    say "$n is up as ${st%/*} ($([[ $st == leader/* ]] && echo primary || echo streaming replica)) after $(since "$t0")s"
}

# Superuser SQL on one node's own PostgreSQL port (not through PgBouncer).
node_super_sql() { # NODE SQL
    PGPASSWORD=$SUPER_PASSWORD "$(psql_bin)" -X -At -v ON_ERROR_STOP=1 \
        "host=127.0.0.1 port=$(pg_port "$1") user=$SUPER_USER dbname=postgres connect_timeout=2" -c "$2"
}
paused_file() { echo "$STACK_DIR/replay_paused"; }

cmd_pause_replay() {
    (($# == 1)) || die "usage: $0 pause-replay NODE"
    local n=$1 st
    node_index "$n" >/dev/null
    st=$(members 2>/dev/null | awk -v o="$n" '$1 == o { print $2 "/" $3 }')
    [[ $st == */streaming ]] || die "$n is not a streaming replica (state: ${st:-unknown})"
    # Patroni (PostgreSQL 14+) resumes a paused replay on its next loop unless the
    # cluster is in maintenance mode; so pause the cluster first.
    patronictl_ pause --wait "$SCOPE" >/dev/null 2>&1 || patronictl_ pause "$SCOPE" >/dev/null 2>&1 || true
    patronictl_ list "$SCOPE" 2>/dev/null | grep -qi 'maintenance mode' \
        || die "could not put the cluster in maintenance mode (patronictl pause)"
    node_super_sql "$n" "SELECT pg_wal_replay_pause()" >/dev/null || die "pg_wal_replay_pause() failed on $n"
    local deadline=$(($(date +%s) + 10)) v
    while :; do
        v=$(node_super_sql "$n" "SELECT pg_get_wal_replay_pause_state()" 2>/dev/null || true)
        [[ $v == paused ]] && break
        (($(date +%s) < deadline)) || die "$n did not report its replay paused (state: ${v:-?})"
        sleep 0.1
    done
    grep -qx "$n" "$(paused_file)" 2>/dev/null || echo "$n" >>"$(paused_file)"
    own "$(paused_file)"
    say "WAL replay paused on $n; cluster in maintenance mode until every paused node is resumed"
}

cmd_resume_replay() {
    (($# == 1)) || die "usage: $0 resume-replay NODE|all"
    local targets=() n rest
    if [[ $1 == all ]]; then targets=("${NODES[@]}"); else node_index "$1" >/dev/null; targets=("$1"); fi
    for n in "${targets[@]}"; do
        node_super_sql "$n" "SELECT pg_wal_replay_resume() WHERE pg_is_in_recovery()" >/dev/null 2>&1 || true
        if [[ -f $(paused_file) ]]; then
            rest=$(grep -vx "$n" "$(paused_file)" || true)
            if [[ -n $rest ]]; then echo "$rest" >"$(paused_file)"; else rm -f "$(paused_file)"; fi
        fi
    done
    if [[ ! -s $(paused_file) ]]; then
        rm -f "$(paused_file)"
        patronictl_ resume --wait "$SCOPE" >/dev/null 2>&1 || patronictl_ resume "$SCOPE" >/dev/null 2>&1 || true
        say "WAL replay resumed on ${targets[*]}; cluster out of maintenance mode"
    else
        say "WAL replay resumed on ${targets[*]}; still paused: $(tr '\n' ' ' <"$(paused_file)")"
    fi
}

cmd_env() {
    cat <<EOF
# fastapi_rwdb app settings for the local HA stack (scripts/stack.sh)
POSTGRES_SERVER=127.0.0.1
POSTGRES_PORT=$WRITE_PORT
POSTGRES_READ_PORT=$READ_PORT
POSTGRES_USER=$APP_USER
POSTGRES_PASSWORD=$APP_PASSWORD
POSTGRES_DB=$APP_DB
EOF
}

cmd_psql() {
    (($# >= 1)) || die "usage: $0 psql write|read|node1|node2|node3 [psql args]"
    local target=$1 port pass
    shift
    case $target in
        write) port=$WRITE_PORT ;;
        read) port=$READ_PORT ;;
        node1 | node2 | node3) port=$(pg_port "$target") ;;
        *) die "usage: $0 psql write|read|node1|node2|node3 [psql args]" ;;
    esac
    if ! command -v psql >/dev/null && [[ ! -x $PG_BIN/psql ]]; then
        [[ $EUID -eq 0 ]] || die "psql not found: install postgresql-client-15"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client-15 >/dev/null
    fi
    pass=$(mktemp)
    printf '127.0.0.1:*:*:%s:%s\n127.0.0.1:*:*:%s:%s\n' "$APP_USER" "$APP_PASSWORD" "$SUPER_USER" "$SUPER_PASSWORD" >"$pass"
    chmod 600 "$pass"
    local rc=0
    PGPASSFILE=$pass PGHOST=127.0.0.1 PGPORT=$port PGUSER=${PGUSER:-$APP_USER} PGDATABASE=${PGDATABASE:-$APP_DB} \
        "$(psql_bin)" "$@" || rc=$?
    rm -f "$pass"
    return $rc
}

cmd_logs() {
    local f
    # shellcheck disable=SC2046
    for f in $(all_logs); do
        [[ -s $f ]] || continue
        printf '\n----- %s -----\n' "$f"
        tail -n "${1:-20}" "$f"
    done
}

usage() {
    cat <<EOF
usage: $0 COMMAND [ARGS]

Local PostgreSQL HA stack (no Docker), data and logs in $STACK_DIR:
etcd 127.0.0.1:2379; Patroni node1..3 (PostgreSQL 15432-15434, REST 18008-18010);
PgBouncer per node 16432-16434; HAProxy write $WRITE_PORT / read $READ_PORT / stats $STATS_PORT;
Redis $REDIS_PORT (the job-queue recipes' broker).

  install               install Debian packages + Patroni venv (idempotent)
  up                    install if needed, start everything, wait until ready; creates the
                        databases $APP_DB (the app's) and $TEST_DB (the tests'), also on an existing cluster
  down [--wipe]         stop everything (--wipe: delete all data too)
  status                patronictl list, who is behind each HAProxy port, process states
  lag DELAY             set recovery_min_apply_delay on the replicas (1s, 200ms, 1000, 0 = off)
  switchover [NODE]     switch the primary to a replica (default: first streaming replica)
  pause-replay NODE     pause WAL replay on one replica (puts the cluster in maintenance mode,
                        or Patroni would resume it); the other replica stays current
  resume-replay NODE|all  resume it; maintenance mode ends once no node is paused
  stop-node NODE        stop one node's Patroni + PostgreSQL
  start-node NODE       start it again and wait until it runs (leader) or streams (replica)
  kill-node NODE        SIGKILL one node's Patroni + PostgreSQL (crash)
  env                   print the app environment (.env format)
  psql TARGET [ARGS]    psql to write|read|node1|node2|node3 as $APP_USER
  logs [N]              last N lines of every log

Environment: RWDB_STACK_DIR (default /var/tmp/rwdb-stack), RWDB_STACK_WRITE_PORT (5432),
RWDB_STACK_READ_PORT (5433), RWDB_STACK_STATS_PORT (7000), RWDB_STACK_REDIS_PORT (6380),
RWDB_STACK_TIMEOUT (120 s for up),
RWDB_STACK_USER (OS user when run as root, default rwdb), RWDB_STACK_VENV (Patroni venv).
EOF
}

# one mutating command at a time per stack dir (e.g. parallel test workers all running `up`)
lock_stack() {
    local lock="$STACK_DIR.lock"
    exec 9>>"$lock" || die "cannot open lock file $lock"
    if ! flock -n 9; then
        say "another scripts/stack.sh command is running on $STACK_DIR; waiting for it"
        flock -w 600 9 || die "timed out waiting for the lock $lock"
    fi
}

main() {
    local cmd=${1:-help}
    (($#)) && shift
    case $cmd in
        install | up | down | lag | switchover | stop-node | start-node | kill-node | pause-replay | resume-replay) lock_stack ;;
    esac
    case $cmd in
        install) cmd_install "$@" ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        lag) cmd_lag "$@" ;;
        switchover) cmd_switchover "$@" ;;
        stop-node) cmd_stop_node "$@" ;;
        start-node) cmd_start_node "$@" ;;
        kill-node) cmd_kill_node "$@" ;;
        pause-replay) cmd_pause_replay "$@" ;;
        resume-replay) cmd_resume_replay "$@" ;;
        env) cmd_env "$@" ;;
        psql) cmd_psql "$@" ;;
        logs) cmd_logs "$@" ;;
        help | -h | --help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
