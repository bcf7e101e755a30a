#!/usr/bin/env bash
# A long-running ActiveMQ for the demo, on 127.0.0.1:61613 (STOMP only).
#
#   scripts/broker.sh start    start it unless something already answers STOMP there
#   scripts/broker.sh stop     stop the broker this script started
#   scripts/broker.sh status   say whether STOMP answers and which broker runs
#
# Files (config, KahaDB, broker.log, broker.pid) live in target/demo-broker/.
# The config comes from the same template as the test brokers'
# (outbox-test-harness/broker/activemq.xml.in). STOMP_PORT overrides the port.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac
dir="$target/demo-broker"
port=${STOMP_PORT:-61613}
activemq_home=${ACTIVEMQ_HOME:-/usr/share/activemq}
pid_file="$dir/broker.pid"
log_file="$dir/broker.log"

say() { printf '[broker] %s\n' "$*"; }

# Prints the pid of the broker this script started, if it still runs.
our_pid() {
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(cat "$pid_file")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  # The pid may have been reused: it must be a JVM running our config.
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir/conf/activemq.xml" || return 1
  echo "$pid"
}

port_open() { timeout 2 bash -c ":</dev/tcp/127.0.0.1/$port" 2>/dev/null; }

# True if a STOMP CONNECT on the port is answered with CONNECTED.
stomp_answers() {
  local reply
  reply=$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf "CONNECT\naccept-version:1.2\nhost:localhost\nheart-beat:0,0\n\n\0" >&3
    head -c 9 <&3
    printf "DISCONNECT\n\n\0" >&3' _ "$port" 2>/dev/null) || return 1
  [ "$reply" = CONNECTED ]
}

write_config() {
  local template xml connector
  template=$(<"$root/outbox-test-harness/broker/activemq.xml.in")
  connector="      <transportConnector name=\"stomp\" uri=\"stomp://127.0.0.1:$port?transport.tcpNoDelay=true\"/>"
  xml=${template//@BROKER_NAME@/outbox-demo}
  xml=${xml//@DATA_DIR@/$dir/data}
  xml=${xml//@PLUGINS@/}
  xml=${xml//@SSL_CONTEXT@/}
  xml=${xml//@CONNECTORS@/$connector$'\n'}
  xml=${xml//@POLICIES@/}
  xml=${xml//@SYSTEM_USAGE@/}
  mkdir -p "$dir/conf" "$dir/data" "$dir/tmp"
  printf '%s\n' "$xml" >"$dir/conf/activemq.xml"
  cp "$root/outbox-test-harness/broker/log4j.properties" "$dir/conf/log4j.properties"
}

start() {
  if stomp_answers; then
    say "a broker already answers STOMP on 127.0.0.1:$port; using it"
    return 0
  fi
  local pid
  if pid=$(our_pid); then
    say "the demo broker (pid $pid) is still starting"
  else
    if port_open; then
      echo "[broker] 127.0.0.1:$port is taken by something that does not answer STOMP" >&2
      return 1
    fi
    if ! command -v java >/dev/null 2>&1 || [ ! -f "$activemq_home/bin/activemq.jar" ]; then
      echo "[broker] java or ActiveMQ is missing; run scripts/setup.sh --broker" \
        "(apt-get install -y openjdk-17-jre-headless activemq)" >&2
      return 1
    fi
    say "writing $dir/conf/activemq.xml (STOMP on 127.0.0.1:$port, KahaDB in $dir/data)"
    write_config
    say "starting ActiveMQ; log: $log_file"
    setsid nohup java -Xms64m -Xmx512m -XX:+UseSerialGC -Djava.awt.headless=true \
      "-Djava.io.tmpdir=$dir/tmp" \
      "-Dlog4j.configuration=file:$dir/conf/log4j.properties" \
      "-Dactivemq.home=$activemq_home" "-Dactivemq.base=$dir" \
      "-Dactivemq.conf=$dir/conf" "-Dactivemq.data=$dir/data" \
      -jar "$activemq_home/bin/activemq.jar" start "xbean:file:$dir/conf/activemq.xml" \
      >>"$log_file" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pid_file"
  fi
  for _ in $(seq 1 120); do
    if stomp_answers; then
      say "ActiveMQ (pid $pid) answers STOMP on 127.0.0.1:$port"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "[broker] ActiveMQ exited during start-up; last lines of $log_file:" >&2
      tail -n 30 "$log_file" >&2
      rm -f "$pid_file"
      return 1
    fi
    sleep 0.5
  done
  echo "[broker] ActiveMQ (pid $pid) did not answer STOMP within 60 s; last lines of $log_file:" >&2
  tail -n 30 "$log_file" >&2
  return 1
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    say "no demo broker started by this script is running"
    rm -f "$pid_file"
    return 0
  fi
  say "stopping ActiveMQ (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; say "stopped"; return 0; }
    sleep 0.5
  done
  say "ActiveMQ did not stop within 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pid_file"
}

status() {
  local pid
  if pid=$(our_pid); then
    say "demo broker running (pid $pid), files in $dir"
  else
    say "no demo broker started by this script is running"
  fi
  if stomp_answers; then
    say "STOMP answers on 127.0.0.1:$port"
  else
    say "nothing answers STOMP on 127.0.0.1:$port"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
