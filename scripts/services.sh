#!/usr/bin/env bash
# Real PostgreSQL, Redis and an S3-compatible server on loopback, for the shared-cache tests.
#
#   scripts/services.sh up DIR     start all three under DIR, write DIR/env.sh (the test URLs)
#   scripts/services.sh down DIR   stop what `up DIR` started
#   scripts/services.sh test PY    up in a temporary folder, run the suites with PY, then down
#
# Every server gets a free port and its own data folder, so two runs on one machine (two
# developers, or CI beside a developer) never share state. Missing servers are installed from
# Debian's packages; the Python extras are the Makefile's job.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_packages() {
    local missing=()
    pg_bindir >/dev/null 2>&1 || missing+=(postgresql)
    command -v redis-server >/dev/null || missing+=(redis-server)
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

pg_bindir() {
    if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [[ -n "$dir" && -x "$dir/initdb" ]] && echo "$dir"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PostgreSQL refuses to run as root: run its tools as the postgres user when we are root.
as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

wait_for() {  # wait_for SECONDS CMD...: poll until CMD succeeds
    local limit=$1; shift
    for ((i = 0; i < limit * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "timed out waiting for: $*" >&2
    return 1
}

up() {
    local dir=$1 py=${2:-python3}
    need_packages
    mkdir -p "$dir"
    chmod 755 "$dir"
    local bin pg_port redis_port s3_port
    bin=$(pg_bindir)
    pg_port=$(free_port)
    redis_port=$(free_port)
    s3_port=$(free_port)

    mkdir -p "$dir/pg"
    [[ $(id -u) == 0 ]] && chown postgres: "$dir/pg"
    as_pg "$bin/initdb" -D "$dir/pg/data" -A trust -U postgres -E UTF8 >"$dir/pg/initdb.log"
    # fsync off: a test database that loses its last writes on power failure costs nothing.
    as_pg "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 start \
        -o "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
        >/dev/null
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres ragkv

    redis-server --port "$redis_port" --bind 127.0.0.1 --daemonize yes --save "" \
        --appendonly no --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_for 20 redis-cli -p "$redis_port" ping

    "$py" -m moto.server -H 127.0.0.1 -p "$s3_port" >"$dir/s3.log" 2>&1 &
    echo $! >"$dir/s3.pid"
    wait_for 60 "$py" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$s3_port/')"
    # The tests' bucket (ragkv creates none: a deployment's bucket exists before it is used).
    "$py" -c "import s3fs; s3fs.S3FileSystem(key='testing', secret='testing', client_kwargs={
        'endpoint_url': 'http://127.0.0.1:$s3_port'}).mkdir('ragkv-test')"

    cat >"$dir/env.sh" <<EOF
export RAGKV_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/ragkv
export RAGKV_TEST_REDIS_URL=redis://127.0.0.1:$redis_port/0
export RAGKV_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port
export RAGKV_SERVICES_DIR=$dir
EOF
    echo "services up under $dir: postgres :$pg_port, redis :$redis_port, s3 :$s3_port"
}

down() {
    local dir=$1 bin
    [[ -d "$dir" ]] || return 0
    bin=$(pg_bindir || true)
    if [[ -n "$bin" && -f "$dir/pg/data/postmaster.pid" ]]; then
        as_pg "$bin/pg_ctl" -D "$dir/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    local pidfile
    for pidfile in "$dir/redis.pid" "$dir/s3.pid"; do
        [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$dir"
}

run_tests() {
    local py=$1
    # Global, not local: the EXIT trap runs after this function has returned.
    RUN_DIR=$(mktemp -d /tmp/ragkv-services.XXXXXX)
    trap 'down "$RUN_DIR"' EXIT
    local start=$SECONDS
    up "$RUN_DIR" "$py"
    # shellcheck disable=SC1091
    source "$RUN_DIR/env.sh"
    echo "services ready in $((SECONDS - start)) s"
    cd "$ROOT"
    export OMP_NUM_THREADS=1
    local suite=(tests/test_cache_index.py tests/test_cache_index_round_trip.py
                 tests/test_cache_index_blobs.py tests/test_cache_index_reports.py
                 tests/test_cache_faults.py tests/test_cache_races.py)
    # The same index/blob suite, once per backend pairing: Postgres with Redis, then with S3.
    RAGKV_TEST_INDEX_URL=$RAGKV_TEST_PG_URL RAGKV_TEST_BLOB_URL=$RAGKV_TEST_REDIS_URL \
        "$py" -m pytest -q -m "not slow and not browser" "${suite[@]}"
    RAGKV_TEST_INDEX_URL=$RAGKV_TEST_PG_URL RAGKV_TEST_BLOB_URL=s3://ragkv-test/blobs \
        "$py" -m pytest -q -m "not slow and not browser" "${suite[@]}"
    # Service-only tests: migrations on Postgres, two nodes, races, outages.
    "$py" -m pytest -q -rs -m services
    # The served deployment on a shared PostgreSQL index and Redis blobs: two vLLM servers,
    # a chunk stored through one is a hit on the other (when vLLM is installed).
    if "$py" -c "import vllm" 2>/dev/null; then
        OMP_NUM_THREADS=2 RAGKV_TEST_INDEX_URL=$RAGKV_TEST_PG_URL \
            RAGKV_TEST_BLOB_URL=$RAGKV_TEST_REDIS_URL \
            "$py" -m pytest -q -m vllm tests/test_vllm_serve.py -k second_server
    fi
    echo "test-services done in $((SECONDS - start)) s"
}

case "${1:-}" in
    up) up "${2:?DIR}" "${3:-python3}" ;;
    down) down "${2:?DIR}" ;;
    test) run_tests "${2:?PY}" ;;
    *) echo "usage: $0 up DIR [PY] | down DIR | test PY" >&2; exit 2 ;;
esac
