#!/bin/sh
# Install PostgreSQL 15's server binaries (Debian's postgresql-15:
# /usr/lib/postgresql/15/bin) for the tests on the PostgreSQL backend, which
# start their own server in a temporary directory (bot/testing/postgres.py).
#
#   sh scripts/install-postgres.sh        # from `make test`; safe to run again
#
# Never fails the build: where it cannot install (not root, no apt-get, no
# postgresql-15 offered) it says why and exits 0; the PostgreSQL tests then
# fail with that reason (they are not skipped). The package must not leave a
# cluster or a service running: a policy-rc.d answering 101 ("action
# forbidden") is in place during the install, postgresql-common is told not
# to create the default cluster, and systemd's unit is disabled and stopped
# where systemd runs.
set -eu

say() { printf 'install-postgres: %s\n' "$*"; }
BIN=${ETCD_CHATOPS_PG_BIN:-/usr/lib/postgresql/15/bin}

ready() { [ -x "$BIN/initdb" ] && [ -x "$BIN/pg_ctl" ] && [ -x "$BIN/postgres" ]; }

if ready; then
    say "PostgreSQL ready in $BIN: $("$BIN/postgres" --version 2>/dev/null)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root: cannot install postgresql-15 (the PostgreSQL tests will fail: no $BIN/initdb)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
    say "no apt-get here: cannot install postgresql-15 (the PostgreSQL tests will fail: no $BIN/initdb)"
    exit 0
fi

. "$(dirname "$0")/apt-lib.sh"
lists_for postgresql-15
version=$(candidate postgresql-15)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    say "this system's package sources offer no postgresql-15: nothing installed" \
        "(the PostgreSQL tests will fail: no $BIN/initdb)"
    exit 0
fi

# Forbid service starts while the package installs (restoring whatever policy was there),
# and no default cluster: the tests make their own.
forbid_service_starts install-postgres.sh
mkdir -p /etc/postgresql-common/createcluster.d
printf '# install-postgres.sh: the tests create their own clusters\ncreate_main_cluster = false\n' \
    > /etc/postgresql-common/createcluster.d/50-etcd-chatops-no-main.conf

say "installing postgresql-15 $version from Debian"
log=$(mktemp /tmp/install-postgres.XXXXXX)
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >"$log" 2>&1; then
    say "apt-get install failed (the PostgreSQL tests will fail):"
    tail -n 5 "$log" | sed 's/^/    /'
fi
rm -f "$log"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now postgresql.service >/dev/null 2>&1 || true
fi

if ready; then
    say "PostgreSQL ready in $BIN: $("$BIN/postgres" --version 2>/dev/null)"
else
    say "installed, but $BIN has no initdb, pg_ctl and postgres (the PostgreSQL tests will fail)"
fi
exit 0
