#!/usr/bin/env bash
# Installs and starts what the tests and the demo need on a Debian machine:
# Java 17 + ActiveMQ (Debian package `activemq`), openssl, PostgreSQL on
# 127.0.0.1:5432 (trust auth, database `test`) and MariaDB on 127.0.0.1:3306
# (root without password, database `test`). Safe to run again: it only does
# what is missing.
#
#   scripts/setup.sh            everything
#   scripts/setup.sh --broker   only Java, ActiveMQ and openssl (enough for the demo)
set -euo pipefail

only_broker=false
case "${1:-}" in
  --broker) only_broker=true ;;
  "") ;;
  *) echo "usage: $0 [--broker]" >&2; exit 2 ;;
esac

say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -eq 0 ]; then
  as_root() { "$@"; }
else
  as_root() { sudo "$@"; }
fi

apt_updated=false
apt_install() {
  if ! $apt_updated; then
    say "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    apt_updated=true
  fi
  say "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

port_open() { timeout 2 bash -c ":</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_for_port() {
  local port=$1 what=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "[setup] $what did not open 127.0.0.1:$port within 60 s" >&2
  return 1
}

# --- Java, ActiveMQ, openssl ----------------------------------------------------
# The JDK, not only the runtime: a test compiles a small JMS client against
# ActiveMQ's own jars.
missing=()
{ command -v java && command -v javac; } >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
[ -f "${ACTIVEMQ_HOME:-/usr/share/activemq}/bin/activemq.jar" ] || missing+=(activemq)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
else
  say "java, javac, ActiveMQ and openssl are installed"
fi

if $only_broker; then
  exit 0
fi

# --- PostgreSQL -------------------------------------------------------------------
pg_ok() { psql -h 127.0.0.1 -U postgres -d "$1" -w -tAc 'SELECT 1' >/dev/null 2>&1; }

if port_open 5432; then
  say "PostgreSQL answers on 127.0.0.1:5432"
else
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  say "starting PostgreSQL $version (cluster main)"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for_port 5432 PostgreSQL
fi

if ! command -v psql >/dev/null 2>&1; then
  apt_install postgresql-client
fi
if ! pg_ok postgres; then
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$hba" ]; then
    echo "[setup] cannot log in to PostgreSQL on 127.0.0.1 as postgres without a password," >&2
    echo "[setup] and there is no local pg_hba.conf to change; set OUTBOX_TEST_POSTGRES_URL instead" >&2
    exit 1
  fi
  say "allowing trust authentication from 127.0.0.1 in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
fi
if pg_ok test; then
  say "PostgreSQL database test exists"
else
  say "creating PostgreSQL database test"
  psql -h 127.0.0.1 -U postgres -d postgres -w -c 'CREATE DATABASE test'
fi

# --- MariaDB ----------------------------------------------------------------------
my_root() { mysql -h 127.0.0.1 -u root "$@"; }

if port_open 3306; then
  say "MariaDB answers on 127.0.0.1:3306"
else
  [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
  as_root install -d -o mysql -g mysql /run/mysqld
  say "starting MariaDB"
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  wait_for_port 3306 MariaDB
fi

command -v mysql >/dev/null 2>&1 || apt_install mariadb-client
if ! my_root -e 'SELECT 1' >/dev/null 2>&1; then
  # Debian's root logs in through the unix socket only; allow an empty password over TCP.
  say "allowing root without a password over TCP"
  as_root mysql -u root <<'SQL'
ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL
fi
my_root -e 'CREATE DATABASE IF NOT EXISTS test'
say "MariaDB database test exists"

say "done"
