#!/usr/bin/env bash
# Entrypoint of the rwdb-stack image (compose.yml). One argument, the role of the container:
#   etcd | node1 | node2 | node3 (Patroni + PostgreSQL 15 + that node's PgBouncer) | haproxy
# Configuration comes from the same templates as scripts/stack.sh (stack/templates), with
# container host names instead of 127.0.0.1; ports are the same as the local stack's.
set -euo pipefail

ROLE=${1:?usage: entrypoint.sh etcd|node1|node2|node3|haproxy}
TEMPLATES=${RWDB_STACK_TEMPLATES:-/opt/rwdb-stack/templates}
BASE=${RWDB_STACK_DIR:-/var/lib/rwdb-stack}
VENV=${RWDB_STACK_VENV:-/opt/rwdb-stack/venv}
PG_BIN=/usr/lib/postgresql/15/bin
# address to listen on inside the container, and host names of the containers (compose services)
LISTEN=${RWDB_STACK_LISTEN:-0.0.0.0}
ETCD_HOST=${RWDB_ETCD_HOST:-etcd}
NODE_HOSTS=("${RWDB_NODE1_HOST:-node1}" "${RWDB_NODE2_HOST:-node2}" "${RWDB_NODE3_HOST:-node3}")

render() { # render TEMPLATE OUT KEY=VALUE...
    local tpl=$TEMPLATES/$1 out=$2 kv content
    shift 2
    content=$(<"$tpl")
    for kv in "$@"; do content=${content//"@${kv%%=*}@"/"${kv#*=}"}; done
    if grep -q '@[A-Z][A-Z0-9_]*@' <<<"$content"; then
        echo "unrendered placeholders in $tpl" >&2
        exit 1
    fi
    printf '%s\n' "$content" >"$out"
}

case $ROLE in
    etcd)
        mkdir -p "$BASE/etcd"
        exec etcd --name rwdb-etcd --data-dir "$BASE/etcd/data" --logger zap \
            --listen-client-urls "http://$LISTEN:2379" --advertise-client-urls "http://$ETCD_HOST:2379" \
            --listen-peer-urls "http://$LISTEN:2380" --initial-advertise-peer-urls "http://$ETCD_HOST:2380" \
            --initial-cluster "rwdb-etcd=http://$ETCD_HOST:2380" --initial-cluster-state new \
            --auto-compaction-retention 1
        ;;
    node1 | node2 | node3)
        i=${ROLE#node}
        i=$((i - 1))
        pg_port=$((15432 + i)) bouncer_port=$((16432 + i)) rest_port=$((18008 + i))
        host=${NODE_HOSTS[$i]}
        d=$BASE/$ROLE
        mkdir -p "$d/run" "$d/log"
        chmod 700 "$d/run"
        render post_bootstrap.sh "$BASE/post_bootstrap.sh" "PSQL=$PG_BIN/psql"
        chmod 755 "$BASE/post_bootstrap.sh"
        render patroni.yml "$d/patroni.yml" \
            "NODE=$ROLE" \
            "REST_LISTEN=$LISTEN:$rest_port" "REST_CONNECT=$host:$rest_port" \
            "ETCD_HOSTS=$ETCD_HOST:2379" "POST_BOOTSTRAP=$BASE/post_bootstrap.sh" \
            "PG_LISTEN=$LISTEN:$pg_port" "PG_CONNECT=$host:$pg_port" \
            "DATA_DIR=$d/data" "BIN_DIR=$PG_BIN" "PGPASS=$d/pgpass" \
            "SOCKET_DIR=$d/run" "LOG_DIR=$d/log" "HBA_ADDR=samenet"
        render pgbouncer.ini "$d/pgbouncer.ini" \
            "NODE=$ROLE" "PG_HOST=127.0.0.1" "PG_PORT=$pg_port" \
            "LISTEN_ADDR=$LISTEN" "LISTEN_PORT=$bouncer_port" \
            "SOCKET_DIR=$d/run" "AUTH_FILE=$d/userlist.txt"
        printf '"rwdb_app" "rwdb_app_pw"\n"postgres" "postgres_pw"\n' >"$d/userlist.txt"
        chmod 600 "$d/patroni.yml" "$d/pgbouncer.ini" "$d/userlist.txt"

        pgbouncer "$d/pgbouncer.ini" &
        bouncer=$!
        "$VENV/bin/patroni" "$d/patroni.yml" &
        patroni=$!
        trap 'kill -TERM "$patroni" "$bouncer" 2>/dev/null || true' TERM INT
        # the container ends when either daemon ends
        rc=0
        wait -n "$patroni" "$bouncer" || rc=$?
        kill -TERM "$patroni" "$bouncer" 2>/dev/null || true
        wait "$patroni" "$bouncer" 2>/dev/null || true
        exit "$rc"
        ;;
    haproxy)
        mkdir -p "$BASE/haproxy"
        render haproxy.cfg "$BASE/haproxy/haproxy.cfg" \
            "BIND_ADDR=$LISTEN" "WRITE_PORT=5432" "READ_PORT=5433" "STATS_PORT=7000" \
            "NODE1_HOST=${NODE_HOSTS[0]}" "NODE2_HOST=${NODE_HOSTS[1]}" "NODE3_HOST=${NODE_HOSTS[2]}"
        exec haproxy -db -f "$BASE/haproxy/haproxy.cfg"
        ;;
    *)
        echo "unknown role '$ROLE' (etcd, node1, node2, node3 or haproxy)" >&2
        exit 2
        ;;
esac
