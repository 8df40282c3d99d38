# Sourced by scripts/test and .ci/run: make sure the local servers the suite needs answer.
# Each `ensure_*` checks the port, starts the server with the machine's own command when it is
# not answering, and waits for it. Under CI=true a server that does not come up is an error.

wait_port() { # host port seconds
  local host=$1 port=$2 secs=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

service_failed() { # name how-to-fix
  if [ "${CI:-}" = "true" ]; then
    echo "scripts/test: $1 is not answering and could not be started: $2" >&2
    exit 1
  fi
  echo "scripts/test: warning: $1 is not answering ($2); its tests will fail" >&2
}

ensure_redis() {
  wait_port 127.0.0.1 6379 1 && return 0
  echo "scripts/test: starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 || true
  wait_port 127.0.0.1 6379 15 || service_failed Redis "install redis-server or start it on 127.0.0.1:6379"
}

ensure_postgres() {
  wait_port 127.0.0.1 5432 1 && return 0
  echo "scripts/test: starting PostgreSQL" >&2
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
  fi
  wait_port 127.0.0.1 5432 30 || service_failed PostgreSQL "install postgresql or start it on 127.0.0.1:5432"
}

ensure_rabbitmq() {
  wait_port 127.0.0.1 5672 1 && return 0
  echo "scripts/test: starting RabbitMQ" >&2
  if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
  wait_port 127.0.0.1 5672 60 || service_failed RabbitMQ "install rabbitmq-server or start it on 127.0.0.1:5672"
}

# The real Python peer for the interoperability tests (tests/interop): a venv with Dramatiq
# 2.2.1 and its Redis and RabbitMQ clients, and dramatiq-abort 1.2.1 (cancellation), made once
# and kept under ~/.cache. Exports TROUPE_DRAMATIQ_PYTHON, which the tests use.
DRAMATIQ_VERSION=2.2.1
DRAMATIQ_ABORT_VERSION=1.2.1
ensure_dramatiq_venv() {
  local venv="${TROUPE_VENV:-$HOME/.cache/troupe/venv-dramatiq}"
  local python="$venv/bin/python"
  local check="import sys, dramatiq, dramatiq_abort, redis, pika; sys.exit(dramatiq.__version__ != '$DRAMATIQ_VERSION' or dramatiq_abort.__version__ != '$DRAMATIQ_ABORT_VERSION')"
  if ! { [ -x "$python" ] && "$python" -c "$check" >/dev/null 2>&1; }; then
    echo "scripts/test: creating the Dramatiq $DRAMATIQ_VERSION venv at $venv" >&2
    local log
    log="$(mktemp)"
    if ! { mkdir -p "$(dirname "$venv")" && python3 -m venv --clear "$venv" >"$log" 2>&1; }; then
      venv_failed "python3 -m venv $venv failed: $(tail -n1 "$log")"
    elif ! "$python" -m pip install --quiet --disable-pip-version-check \
      "dramatiq[redis,rabbitmq]==$DRAMATIQ_VERSION" "dramatiq-abort==$DRAMATIQ_ABORT_VERSION" >"$log" 2>&1; then
      venv_failed "pip install 'dramatiq[redis,rabbitmq]==$DRAMATIQ_VERSION' 'dramatiq-abort==$DRAMATIQ_ABORT_VERSION' into $venv failed: $(grep -i error "$log" | tail -n1)"
    elif ! "$python" -c "$check" >"$log" 2>&1; then
      venv_failed "the venv at $venv does not import dramatiq $DRAMATIQ_VERSION, dramatiq-abort $DRAMATIQ_ABORT_VERSION, redis and pika: $(tail -n1 "$log")"
    fi
    rm -f "$log"
  fi
  export TROUPE_DRAMATIQ_PYTHON="$python"
}

venv_failed() { # what failed
  if [ "${CI:-}" = "true" ]; then
    echo "scripts/test: $1" >&2
    exit 1
  fi
  echo "scripts/test: warning: $1; the interop tests will fail" >&2
}

# The dashboard's browser tests drive Debian's Chromium through chromedriver.
ensure_chromium() {
  if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then
    return 0
  fi
  echo "scripts/test: installing chromium and chromium-driver (one time)" >&2
  local log
  log="$(mktemp)"
  if ! { apt-get install -y chromium chromium-driver >"$log" 2>&1 \
    || { apt-get update >>"$log" 2>&1 && apt-get install -y chromium chromium-driver >>"$log" 2>&1; }; }; then
    service_failed "chromedriver" "apt-get install chromium chromium-driver failed: $(tail -n1 "$log")"
  fi
  rm -f "$log"
}

# The PostgreSQL tests through a pooler start Debian's PgBouncer themselves (on a port of their
# own, in front of the machine's server); only the program is needed.
ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    return 0
  fi
  echo "scripts/test: installing pgbouncer (one time)" >&2
  local log
  log="$(mktemp)"
  if ! { apt-get install -y pgbouncer >"$log" 2>&1 \
    || { apt-get update >>"$log" 2>&1 && apt-get install -y pgbouncer >>"$log" 2>&1; }; }; then
    service_failed "pgbouncer" "apt-get install pgbouncer failed: $(tail -n1 "$log")"
  fi
  rm -f "$log"
  # Debian starts a pgbouncer service on 6432 on install; the tests run their own.
  systemctl disable --now pgbouncer >/dev/null 2>&1 || service pgbouncer stop >/dev/null 2>&1 || true
}

# Tests leave namespaces and schemas of their own behind (one per case); drop old ones so the
# servers do not fill up across runs.
cleanup_test_data() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'troupe-test-*' 2>/dev/null | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'troupe-crash-*' 2>/dev/null | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'troupe-cli-*' 2>/dev/null | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern 'troupe-dash-*' 2>/dev/null | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
  fi
  if command -v psql >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -d test -qAt -c "SELECT 'DROP SCHEMA ' || nspname || ' CASCADE;' FROM pg_namespace WHERE nspname LIKE 'troupe\_t\_%'" 2>/dev/null \
      | psql -h 127.0.0.1 -U postgres -d test -q >/dev/null 2>&1 || true
  fi
}

# The servers the current test suite uses. Issue by issue, backends add theirs here.
ensure_services() {
  ensure_postgres
  ensure_redis
  ensure_rabbitmq
  ensure_dramatiq_venv
  ensure_chromium
  ensure_pgbouncer
  cleanup_test_data
}
