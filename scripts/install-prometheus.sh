#!/bin/sh
# Install Prometheus 2.42 and Alertmanager 0.25 (Debian's prometheus and
# prometheus-alertmanager: /usr/bin/prometheus, promtool, prometheus-alertmanager, amtool)
# for tests/test_prometheus_rules.py, which checks deploy/prometheus/ with
# promtool and amtool and starts its own servers on loopback
# (bot/testing/prometheus.py).
#
#   sh scripts/install-prometheus.sh        # from `make test`; safe to run again
#
# Never fails the build: where it cannot install (not root, no apt-get, no
# package offered) it says why and exits 0; the Prometheus tests then fail
# with that reason (they are not skipped). The packages must not leave a
# service running: a policy-rc.d answering 101 ("action forbidden") is in
# place during the install, systemd's units are disabled and stopped where
# systemd runs, and any prometheus or alertmanager process that appeared
# during the install is ended.
set -eu

say() { printf 'install-prometheus: %s\n' "$*"; }
TOOLS="/usr/bin/prometheus /usr/bin/promtool /usr/bin/prometheus-alertmanager /usr/bin/amtool"

ready() {
    for tool in $TOOLS; do [ -x "$tool" ] || return 1; done
}

report() {
    say "ready: $(/usr/bin/prometheus --version 2>&1 | head -n 1), $(/usr/bin/prometheus-alertmanager --version 2>&1 | head -n 1)"
}

if ready; then
    report
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root: cannot install prometheus and prometheus-alertmanager (the Prometheus tests will fail)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
    say "no apt-get here: cannot install prometheus and prometheus-alertmanager (the Prometheus tests will fail)"
    exit 0
fi

. "$(dirname "$0")/apt-lib.sh"
lists_for prometheus-alertmanager
prometheus=$(candidate prometheus)
alertmanager=$(candidate prometheus-alertmanager)
case "$prometheus/$alertmanager" in
    "(none)"/* | */"(none)" | /* | */)
        say "this system's package sources offer prometheus '${prometheus:-none}' and prometheus-alertmanager" \
            "'${alertmanager:-none}': nothing installed (the Prometheus tests will fail)"
        exit 0 ;;
esac

before=$(pids_of /usr/bin/prometheus /usr/bin/prometheus-alertmanager | tr '\n' ' ')
forbid_service_starts install-prometheus.sh

say "installing prometheus $prometheus and prometheus-alertmanager $alertmanager from Debian"
log=$(mktemp /tmp/install-prometheus.XXXXXX)
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        prometheus-alertmanager >"$log" 2>&1; then
    say "apt-get install failed (the Prometheus tests will fail):"
    tail -n 5 "$log" | sed 's/^/    /'
fi
rm -f "$log"

# A systemd host would start the units on boot (or now, had policy-rc.d been ignored).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus.service prometheus-alertmanager.service >/dev/null 2>&1 || true
fi
# Whatever started during the install goes; servers that ran before are not ours to touch.
end_started "$before" /usr/bin/prometheus /usr/bin/prometheus-alertmanager

if ready; then
    report
else
    say "installed, but $TOOLS are not all there (the Prometheus tests will fail)"
fi
exit 0
