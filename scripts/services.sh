#!/usr/bin/env bash
# Local backing services for outbox: PostgreSQL, Redis and Kafka on loopback,
# installed from Debian packages / Maven Central and run without Docker.
#
#   scripts/services.sh up               install (if needed) and start all three, wait until
#                                        they accept connections, print the env lines
#   scripts/services.sh down             stop all three
#   scripts/services.sh status           one line per service
#   scripts/services.sh env              print the env lines (eval "$(scripts/services.sh env)")
#   scripts/services.sh start NAME       start one service (NAME: postgres|redis|kafka)
#   scripts/services.sh stop NAME        stop one service
#   scripts/services.sh kafka-console-consumer TOPIC [ARGS]
#                                        Kafka's console consumer on TOPIC, from the beginning
#                                        (ARGS go to it, e.g. --max-messages 1); fetches the
#                                        kafka-tools jars on first use
#
# `env` warns on stderr about each service that is not running (exit 0 all the same: the
# lines are right either way, and `eval "$(scripts/services.sh env)"` must not abort a shell).
#
# State (data, logs, pid files, cached Kafka jars) lives in <repo>/.services/ (git-ignored).
# Idempotent: `up` on running services is a quick no-op; a second `up` never re-downloads.
# Progress goes to stderr; only the env lines go to stdout.
# docker-compose.yml at the repo root offers the same services on the same ports, and
# Postgres with the same TLS certificate (.services/pg/tls).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SVC="$ROOT/.services"

PG_PORT=5432
REDIS_PORT=6379
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
KAFKA_VERSION=4.3.1
LOG4J_VERSION=2.26.1
SLF4J_VERSION=2.0.17
WAIT_TIMEOUT="${SERVICES_WAIT_TIMEOUT:-120}"

PG_DIR="$SVC/pg"
PG_DATA="$PG_DIR/data"
PG_RUN="$PG_DIR/run"
PG_LOG="$PG_DIR/postgres.log"
PG_TLS="$PG_DIR/tls"   # a self-signed certificate for 127.0.0.1: clients can verify-full

REDIS_DIR="$SVC/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

KAFKA_DIR="$SVC/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_CONF="$KAFKA_DIR/config"
KAFKA_LOGDIR="$KAFKA_DIR/logs"
KAFKA_LOG="$KAFKA_LOGDIR/server.log"   # log4j2 output (WARN+, plus the "started" line)
KAFKA_OUT="$KAFKA_LOGDIR/kafka.out"    # stdout/stderr of the JVM
KAFKA_PID="$KAFKA_DIR/kafka.pid"
# kafka-tools (console consumer) in a directory of its own: fetching it never replaces the
# jars of a running broker.
KAFKA_TOOLS_LIBS="$KAFKA_DIR/tools-libs"

export DEBIAN_FRONTEND=noninteractive

env_lines() {
  cat <<EOF
export OUTBOX_DATABASE_URL=postgresql://outbox:outbox-dev@127.0.0.1:$PG_PORT/outbox
export OUTBOX_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
export OUTBOX_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
EOF
}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

# Print the last lines of a log file to stderr (used when a service fails to come up).
show_log() {
  local f
  for f in "$@"; do
    if [[ -s "$f" ]]; then
      printf '[services] ---- last lines of %s ----\n' "$f" >&2
      tail -n 60 "$f" >&2 || true
      printf '[services] ---- end of %s ----\n' "$f" >&2
    fi
  done
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# A process counts as alive only if it exists and is not a zombie: the daemons here are
# reparented to PID 1, which on some container machines never reaps them, and kill -0
# succeeds on a zombie.
pid_alive() {
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  local st
  st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
  [[ -n "$st" && "$st" != Z ]]
}
read_pid() { if [[ -s "$1" ]]; then head -n1 "$1" | tr -dc '0-9'; fi; }

# ---------------------------------------------------------------- lock
# Serialise concurrent up/down/start/stop calls (several people share one machine).
# Every service launch closes fd 9 (9>&-) so daemons never inherit the lock.
take_lock() {
  mkdir -p "$SVC"
  exec 9>"$SVC/.lock"
  if ! flock -w 600 9; then
    die "another scripts/services.sh is still running (lock $SVC/.lock held for 600 s)"
  fi
}

# ---------------------------------------------------------------- packages
APT_UPDATED=0
apt_install() {
  (($# == 0)) && return 0
  [[ "$(id -u)" == 0 ]] || die "need root to apt-get install: $*"
  # Keep Debian's maintainer scripts from starting their own postgres/redis
  # services on our ports (same trick as Docker images).
  local made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0 apt_log="$SVC/apt.log"
  mkdir -p "$SVC"
  {
    if ((APT_UPDATED == 0)); then
      log "apt-get update"
      apt-get update -q >"$apt_log" 2>&1 && APT_UPDATED=1
    fi &&
      log "apt-get install $* (output in $apt_log)" &&
      apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" \
        </dev/null >>"$apt_log" 2>&1
  } 9>&- || rc=$?
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  if ((rc != 0)); then
    show_log "$apt_log"
    die "apt-get install $* failed (exit $rc)"
  fi
}

pg_bin_dir() {
  local d
  d="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1 || true)"
  [[ -n "$d" && -x "$d/pg_ctl" && -x "$d/initdb" && -x "$d/postgres" ]] && printf '%s\n' "$d"
}

ensure_pg_installed() {
  if [[ -z "$(pg_bin_dir)" ]] || ! command -v psql >/dev/null || ! command -v pg_isready >/dev/null; then
    apt_install postgresql postgresql-client
  fi
  PGBIN="$(pg_bin_dir)" || die "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin"
  id postgres >/dev/null 2>&1 || die "user 'postgres' missing after installing postgresql"
}

ensure_redis_installed() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server redis-tools
  fi
}

java_major() {
  java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit }'
}

ensure_kafka_tools_installed() {
  local pkgs=()
  if ! command -v java >/dev/null || [[ "$(java_major)" -lt 17 ]]; then
    pkgs+=(openjdk-17-jre-headless)
  fi
  command -v mvn >/dev/null || pkgs+=(maven)
  apt_install "${pkgs[@]}"
  [[ "$(java_major)" -ge 17 ]] || die "Kafka $KAFKA_VERSION needs Java 17+, found: $(java -version 2>&1 | head -n1)"
}

# ---------------------------------------------------------------- postgres
as_pg() {
  # cd / so postgres never complains about an unreadable cwd; 9>&- drops the lock fd.
  (cd / && runuser -u postgres -- "$@") 9>&-
}

# The postgres user must be able to reach .services/pg: make each parent directory
# searchable (o+x only: no read permission is granted).
make_traversable() {
  local d="$1" dirs=()
  while [[ "$d" != "/" && -n "$d" ]]; do
    dirs=("$d" "${dirs[@]}")
    d="$(dirname "$d")"
  done
  for d in "${dirs[@]}"; do # top-down: only the directory that actually blocks gets o+x
    if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
      log "chmod o+x $d (so the postgres user can reach $PG_DIR)"
      chmod o+x "$d"
    fi
  done
}

pg_pid() { if [[ -s "$PG_DATA/postmaster.pid" ]]; then head -n1 "$PG_DATA/postmaster.pid" | tr -dc '0-9'; fi; }

pg_running() {
  local pid
  pid="$(pg_pid)"
  pid_alive "$pid" && grep -qx 'postgres' "/proc/$pid/comm" 2>/dev/null
}

# A self-signed server certificate for 127.0.0.1 (once), so TLS is tested for real:
# sslmode=require, and verify-full with sslrootcert=$PG_TLS/server.crt.
pg_tls() {
  if [[ ! -s "$PG_TLS/server.crt" || ! -s "$PG_TLS/server.key" ]]; then
    command -v openssl >/dev/null || apt_install openssl
    mkdir -p "$PG_TLS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=127.0.0.1" \
      -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      -keyout "$PG_TLS/server.key" -out "$PG_TLS/server.crt" >"$PG_DIR/openssl.log" 2>&1 ||
      { show_log "$PG_DIR/openssl.log"; die "openssl could not make the server certificate"; }
  fi
  # On every start: docker-compose.yml's Postgres may have made them, as root.
  chown -R postgres:postgres "$PG_TLS"
  chmod 600 "$PG_TLS/server.key"
  chmod 644 "$PG_TLS/server.crt"
}

pg_write_conf() {
  # Regenerated on every start so a moved checkout still gets the right paths.
  cat >"$PG_DATA/outbox.conf" <<EOF
# Written by scripts/services.sh on every start; edits here are overwritten.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
max_connections = 300
shared_buffers = 256MB
fsync = on
synchronous_commit = on
full_page_writes = on
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
ssl = on
ssl_cert_file = '$PG_TLS/server.crt'
ssl_key_file = '$PG_TLS/server.key'
EOF
  chown postgres:postgres "$PG_DATA/outbox.conf"
  grep -q "^include_if_exists = 'outbox.conf'" "$PG_DATA/postgresql.conf" ||
    printf "\ninclude_if_exists = 'outbox.conf'\n" >>"$PG_DATA/postgresql.conf"
}

pg_wait_ready() {
  local t0="$1" deadline=$((SECONDS + WAIT_TIMEOUT))
  until pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      show_log "$PG_LOG"
      die "postgres did not accept connections on 127.0.0.1:$PG_PORT within ${WAIT_TIMEOUT}s"
    fi
    sleep 0.5
  done
  local out
  until out="$(PGPASSWORD=outbox-dev PGCONNECT_TIMEOUT=5 psql -h 127.0.0.1 -p "$PG_PORT" -U outbox -d outbox -XAtqc 'select 1' 2>&1)" && [[ "$out" == 1 ]]; do
    if ((SECONDS >= deadline)); then
      show_log "$PG_LOG"
      die "postgres is up but 'select 1' as outbox failed: $out"
    fi
    sleep 0.5
  done
  log "postgres: ready on 127.0.0.1:$PG_PORT in $(elapsed "$t0")s"
}

pg_bootstrap_roles() {
  local psql_pg=(psql -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres -X -q -v ON_ERROR_STOP=1)
  as_pg "${psql_pg[@]}" >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox') THEN
    CREATE ROLE outbox LOGIN SUPERUSER PASSWORD 'outbox-dev';
  ELSE
    ALTER ROLE outbox LOGIN SUPERUSER PASSWORD 'outbox-dev';
  END IF;
END
$$;
SQL
  if [[ "$(as_pg "${psql_pg[@]}" -Atc "SELECT 1 FROM pg_database WHERE datname = 'outbox'")" != 1 ]]; then
    as_pg "${psql_pg[@]}" -c 'CREATE DATABASE outbox OWNER outbox' >/dev/null
  fi
}

start_postgres() {
  local t0
  t0="$(now)"
  ensure_pg_installed
  if pg_running; then
    log "postgres: already running (127.0.0.1:$PG_PORT)"
    pg_bootstrap_roles # idempotent: a data dir of an older checkout gets today's password
    pg_wait_ready "$t0"
    return 0
  fi
  if port_open "$PG_PORT"; then
    die "port $PG_PORT is taken by another process (Debian's own cluster? stop it first); not ours: $PG_DATA"
  fi
  mkdir -p "$PG_DIR" "$PG_RUN"
  chown postgres:postgres "$PG_DIR" "$PG_RUN"
  chmod 700 "$PG_RUN"
  make_traversable "$PG_DIR"
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    log "postgres: initdb $PG_DATA"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DATA"
    chown postgres:postgres "$PG_DATA"
    chmod 700 "$PG_DATA"
    as_pg "$PGBIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1 ||
      { show_log "$PG_DIR/initdb.log"; die "initdb failed"; }
  fi
  pg_tls
  pg_write_conf
  if [[ -f "$PG_DATA/postmaster.pid" ]]; then
    # Left by a postmaster that died (or is a zombie, which postgres would take for a
    # live server): with no live postmaster the lock file is stale.
    log "postgres: removing stale postmaster.pid (pid $(pg_pid) is gone)"
    rm -f "$PG_DATA/postmaster.pid"
  fi
  # Same for the socket lock file (postgres checks its PID with kill -0 too).
  rm -f "$PG_RUN/.s.PGSQL.$PG_PORT.lock" "$PG_RUN/.s.PGSQL.$PG_PORT"
  touch "$PG_LOG"
  chown postgres:postgres "$PG_LOG"
  log "postgres: starting ($PGBIN)"
  if ! as_pg "$PGBIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$WAIT_TIMEOUT" >/dev/null 2>&1; then
    show_log "$PG_LOG"
    die "pg_ctl start failed"
  fi
  pg_bootstrap_roles
  pg_wait_ready "$t0"
}

# $1: pg_ctl's shutdown mode. fast: a clean shutdown (what `stop` does); immediate: a crash
# (no shutdown checkpoint, WAL not yet flushed is lost, recovery at the next start).
stop_postgres() {
  local mode="${1:-fast}"
  if ! pg_running; then
    log "postgres: not running"
    return 0
  fi
  log "postgres: stopping ($mode)"
  as_pg "$(pg_bin_dir)/pg_ctl" stop -D "$PG_DATA" -m "$mode" -w -t 120 >/dev/null ||
    die "pg_ctl stop failed"
  log "postgres: stopped"
}

status_postgres() {
  if pg_running; then
    echo "postgres running 127.0.0.1:$PG_PORT pid=$(pg_pid) data=$PG_DATA"
  else
    echo "postgres stopped 127.0.0.1:$PG_PORT"
  fi
}

# ---------------------------------------------------------------- redis
redis_running() {
  local pid
  pid="$(read_pid "$REDIS_PID")"
  pid_alive "$pid" && grep -q redis "/proc/$pid/comm" 2>/dev/null
}

start_redis() {
  local t0
  t0="$(now)"
  ensure_redis_installed
  if redis_running; then
    log "redis: already running (127.0.0.1:$REDIS_PORT)"
  else
    if port_open "$REDIS_PORT"; then
      die "port $REDIS_PORT is taken by another process (not the redis of $REDIS_DIR)"
    fi
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_PID"
    log "redis: starting"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
      --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
      --save "" --appendonly no 9>&- >/dev/null ||
      { show_log "$REDIS_LOG"; die "redis-server failed to start"; }
  fi
  local deadline=$((SECONDS + WAIT_TIMEOUT))
  until [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; do
    if ((SECONDS >= deadline)); then
      show_log "$REDIS_LOG"
      die "redis did not answer PING on 127.0.0.1:$REDIS_PORT within ${WAIT_TIMEOUT}s"
    fi
    sleep 0.2
  done
  log "redis: ready on 127.0.0.1:$REDIS_PORT in $(elapsed "$t0")s"
}

stop_redis() {
  if ! redis_running; then
    log "redis: not running"
    rm -f "$REDIS_PID"
    return 0
  fi
  local pid
  pid="$(read_pid "$REDIS_PID")"
  log "redis: stopping"
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while pid_alive "$pid"; do
    ((SECONDS >= deadline)) && { kill -9 "$pid" 2>/dev/null || true; break; }
    sleep 0.2
  done
  rm -f "$REDIS_PID"
  log "redis: stopped"
}

status_redis() {
  if redis_running; then
    echo "redis running 127.0.0.1:$REDIS_PORT pid=$(read_pid "$REDIS_PID")"
  else
    echo "redis stopped 127.0.0.1:$REDIS_PORT"
  fi
}

# ---------------------------------------------------------------- kafka
kafka_running() {
  local pid
  pid="$(read_pid "$KAFKA_PID")"
  pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -c 'kafka\.Kafka' >/dev/null
}

# Download org.apache.kafka:$1 $KAFKA_VERSION and its runtime dependencies into $2, once (a
# marker file per version); $3 names them in the log. slf4j-api 2.x is declared explicitly:
# Kafka brings slf4j-api 1.7.x, which cannot see the log4j-slf4j2-impl provider (nothing
# would be logged).
maven_fetch_kafka() {
  local artifact="$1" dest="$2" what="$3"
  local marker="$dest/.complete-$KAFKA_VERSION"
  [[ -f "$marker" ]] && return 0
  ensure_kafka_tools_installed
  local t0 dir="$KAFKA_DIR/pom-$artifact" tmp="$dest.tmp"
  t0="$(now)"
  log "kafka: downloading $what $KAFKA_VERSION jars from Maven Central (once)"
  mkdir -p "$dir"
  cat >"$dir/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/services.sh: the runtime classpath of $what. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.outbox.services</groupId>
  <artifactId>$artifact-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>$artifact</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
  rm -rf "$tmp"
  if ! (cd "$dir" && mvn -B -q -f pom.xml dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" </dev/null >"$dir/mvn.log" 2>&1) 9>&-; then
    show_log "$dir/mvn.log"
    die "maven could not fetch the $what $KAFKA_VERSION jars"
  fi
  [[ -f "$tmp/$artifact-$KAFKA_VERSION.jar" ]] || die "$artifact-$KAFKA_VERSION.jar missing after maven run"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  touch "$marker"
  log "kafka: $(find "$dest" -name '*.jar' | wc -l) jars in $dest ($(du -sh "$dest" | cut -f1)) in $(elapsed "$t0")s"
}

# The broker: kafka_2.13, its runtime dependencies and the log4j2 binding.
kafka_fetch_libs() { maven_fetch_kafka kafka_2.13 "$KAFKA_LIBS" "a Kafka broker"; }

# kafka-tools (the console clients); they log warnings to stderr only.
kafka_fetch_tools() {
  maven_fetch_kafka kafka-tools "$KAFKA_TOOLS_LIBS" "Kafka's console tools"
  [[ -f "$KAFKA_TOOLS_LIBS/log4j2.properties" ]] && return 0
  cat >"$KAFKA_TOOLS_LIBS/log4j2.properties" <<EOF
# Written by scripts/services.sh: the console tools log warnings to stderr only.
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
}

# Kafka's console consumer on topic $1, from the beginning; the other arguments go to it.
kafka_console_consumer() {
  local topic="${1:-}"
  [[ -n "$topic" ]] || usage
  shift
  kafka_running || die "kafka is not running: bash scripts/services.sh start kafka"
  take_lock
  kafka_fetch_tools
  exec 9>&-
  exec java -Xms32m -Xmx256m -Dlog4j2.configurationFile="$KAFKA_TOOLS_LIBS/log4j2.properties" \
    -cp "$KAFKA_TOOLS_LIBS/*" org.apache.kafka.tools.consumer.ConsoleConsumer \
    --bootstrap-server "127.0.0.1:$KAFKA_PORT" --topic "$topic" --from-beginning \
    --formatter-property print.key=true "$@"
}

kafka_write_config() {
  mkdir -p "$KAFKA_CONF" "$KAFKA_DATA" "$KAFKA_LOGDIR"
  cat >"$KAFKA_CONF/server.properties" <<EOF
# Written by scripts/services.sh on every start; edits here are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
# 1 MB offset and time indexes per segment instead of 10 MB: on this kernel a write into a
# fresh preallocated index costs the broker ~0.2 ms per MB of it; with 10 MB a produce request
# that added index entries to 3,000 partitions took 12-16 s (docs/benchmarks.md, "Many topics").
log.index.size.max.bytes=1048576
EOF
  cat >"$KAFKA_CONF/log4j2.properties" <<EOF
# Written by scripts/services.sh. WARN and above go to server.log, plus the
# single "Kafka Server started" INFO line that services.sh waits for.
status = warn
name = outbox-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $KAFKA_LOG
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
EOF
}

kafka_java() {
  (cd "$KAFKA_DIR" && java -Xms64m -Xmx256m -Dlog4j2.configurationFile="$KAFKA_CONF/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@") 9>&-
}

kafka_format_storage() {
  [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
  local cid
  cid="$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 | tr -d '[:space:]')"
  [[ "$cid" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: could not generate a cluster id (got '$cid')"
  log "kafka: formatting $KAFKA_DATA (cluster id $cid)"
  if ! kafka_java kafka.tools.StorageTool format --standalone --cluster-id="$cid" \
    -c "$KAFKA_CONF/server.properties" >"$KAFKA_LOGDIR/format.log" 2>&1; then
    show_log "$KAFKA_LOGDIR/format.log"
    die "kafka storage format failed"
  fi
}

# A real protocol check: send an ApiVersions v0 request (correlation id 7) and expect
# a response carrying correlation id 7 and error code 0.
kafka_api_ok() {
  local out
  out="$(timeout 3 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'"$KAFKA_PORT"' || exit 1
    printf "\x00\x00\x00\x0c\x00\x12\x00\x00\x00\x00\x00\x07\x00\x02ob" >&3
    head -c 10 <&3 | od -An -tx1' 2>/dev/null | tr -d ' \n')" || return 1
  [[ "$out" =~ ^[0-9a-f]{8}000000070000$ ]]
}

start_kafka() {
  local t0
  t0="$(now)"
  if kafka_running; then
    log "kafka: already running (127.0.0.1:$KAFKA_PORT)"
    kafka_wait_ready "$t0" 0
    return 0
  fi
  ensure_kafka_tools_installed
  kafka_fetch_libs
  local p
  for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    port_open "$p" && die "port $p is taken by another process (not the kafka of $KAFKA_DIR)"
  done
  kafka_write_config
  kafka_format_storage
  touch "$KAFKA_LOG"
  local log_offset
  log_offset="$(stat -c %s "$KAFKA_LOG")"
  log "kafka: starting Kafka $KAFKA_VERSION (KRaft broker+controller)"
  rm -f "$KAFKA_PID"
  # setsid: own session, so the broker outlives the calling shell / its Ctrl-C.
  (
    cd "$KAFKA_DIR"
    # shellcheck disable=SC2016 # expanded by the inner bash
    KAFKA_PID_FILE="$KAFKA_PID" setsid nohup bash -c 'echo $$ >"$KAFKA_PID_FILE"; exec "$@"' kafka \
      java -Xms512m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$KAFKA_CONF/log4j2.properties" \
      -Dkafka.logs.dir="$KAFKA_LOGDIR" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONF/server.properties" \
      </dev/null >>"$KAFKA_OUT" 2>&1 &
  ) 9>&-
  for _ in $(seq 50); do [[ -s "$KAFKA_PID" ]] && break; sleep 0.1; done
  kafka_wait_ready "$t0" "$log_offset"
}

kafka_wait_ready() {
  local t0="$1" log_offset="$2" deadline=$((SECONDS + WAIT_TIMEOUT)) started=0
  while :; do
    if ! kafka_running; then
      show_log "$KAFKA_OUT" "$KAFKA_LOG"
      die "kafka process exited during startup"
    fi
    # grep -c reads to the end: `grep -q` quits at the match, and `tail` writing the rest of a
    # big log then dies of SIGPIPE, which pipefail reads as "not started" (120 s, then failed).
    if ((started == 0)) && tail -c +"$((log_offset + 1))" "$KAFKA_LOG" 2>/dev/null | grep -c 'Kafka Server started' >/dev/null; then
      started=1
    fi
    if ((started)) && kafka_api_ok; then
      break
    fi
    if ((SECONDS >= deadline)); then
      show_log "$KAFKA_OUT" "$KAFKA_LOG"
      die "kafka did not become ready on 127.0.0.1:$KAFKA_PORT within ${WAIT_TIMEOUT}s"
    fi
    sleep 0.5
  done
  log "kafka: ready on 127.0.0.1:$KAFKA_PORT in $(elapsed "$t0")s"
}

stop_kafka() {
  if ! kafka_running; then
    log "kafka: not running"
    rm -f "$KAFKA_PID"
    return 0
  fi
  local pid
  pid="$(read_pid "$KAFKA_PID")"
  log "kafka: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 60))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "kafka: still running after 60s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.2
  done
  rm -f "$KAFKA_PID"
  log "kafka: stopped"
}

status_kafka() {
  if kafka_running; then
    local ready=""
    kafka_api_ok || ready=" (not answering yet)"
    echo "kafka running 127.0.0.1:$KAFKA_PORT pid=$(read_pid "$KAFKA_PID")$ready"
  else
    echo "kafka stopped 127.0.0.1:$KAFKA_PORT"
  fi
}

# ---------------------------------------------------------------- main
usage() {
  cat >&2 <<EOF
usage: $0 up|down|status|env|start NAME|stop NAME     (NAME: postgres|redis|kafka)
       $0 crash postgres      (pg_ctl stop -m immediate: a crash, for the chaos tests)
       $0 kafka-console-consumer TOPIC [ARGS...]
EOF
  exit 2
}

check_name() {
  case "${1:-}" in
    postgres | redis | kafka) ;;
    *) usage ;;
  esac
}

# A warning on stderr for each service that is not running (the first error would
# otherwise be a refused connection much later).
warn_not_running() {
  pg_running || log "warning: postgres is not running: start it with: bash scripts/services.sh up"
  redis_running || log "warning: redis is not running: start it with: bash scripts/services.sh up"
  kafka_running || log "warning: kafka is not running: start it with: bash scripts/services.sh up"
  return 0
}

write_env() {
  env_lines >"$SVC/env"
  env_lines
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    up)
      take_lock
      local t0
      t0="$(now)"
      start_postgres
      start_redis
      start_kafka
      log "all services up in $(elapsed "$t0")s"
      write_env
      ;;
    down)
      take_lock
      stop_kafka
      stop_redis
      stop_postgres
      ;;
    start)
      check_name "${2:-}"
      take_lock
      "start_$2"
      ;;
    stop)
      check_name "${2:-}"
      take_lock
      "stop_$2"
      ;;
    crash)
      [[ "${2:-}" == postgres ]] || usage
      take_lock
      stop_postgres immediate
      ;;
    status)
      status_postgres
      status_redis
      status_kafka
      ;;
    env)
      env_lines
      warn_not_running
      ;;
    kafka-console-consumer)
      shift
      kafka_console_consumer "$@"
      ;;
    *)
      usage
      ;;
  esac
}

main "$@"
