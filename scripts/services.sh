#!/usr/bin/env bash
# Makes sure the local RabbitMQ and PostgreSQL that weir's tests use are up
# on 127.0.0.1, starting them if they are down and installing them from
# Debian's packages if they are missing. Idempotent.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "services: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if port_open 5432; then return 0; fi
  local fresh=""
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "services: installing PostgreSQL" >&2
    apt_install postgresql
    fresh=1
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ -n "$fresh" ]; then
    # Local test server: trust connections from this machine only.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  echo "services: starting PostgreSQL $version" >&2
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 PostgreSQL
  if [ -n "$fresh" ]; then
    su postgres -c "psql -q -c 'CREATE DATABASE test'" || true
  fi
}

ensure_rabbitmq() {
  if port_open 5672; then return 0; fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services: installing RabbitMQ" >&2
    apt_install rabbitmq-server
  fi
  echo "services: starting RabbitMQ" >&2
  rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ
  # The port opens before the broker accepts logins; wait for it to be up.
  for _ in $(seq 1 60); do
    rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && return 0
    sleep 1
  done
}

ensure_postgres
ensure_rabbitmq
echo "services: PostgreSQL and RabbitMQ are up on 127.0.0.1" >&2
