#!/usr/bin/env bash
# The programs behind the services the tests start for themselves: PostgreSQL's server from Debian's `postgresql`
# package (the S3 server, moto, comes with the dev extra). Installs it when it is missing and this is root with
# apt-get; otherwise says that the PostgreSQL tests will be skipped. Does nothing when it is there already.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing PostgreSQL (Debian's postgresql package) for the registry tests..."
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; then
    exit 0
  fi
fi
echo "PostgreSQL is not installed and could not be installed here (needs root and apt-get): its tests will be skipped" >&2
