# Shared by the install-*.sh scripts (sourced, POSIX sh): Debian package lookups, and
# installing a package without letting it start a service (or ending one it started anyway).

candidate() {  # candidate PKG: the version apt would install, or "" / "(none)"
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p'
}

lists_for() {  # lists_for PKG: refresh the package lists when they offer no PKG
    if [ -z "$(candidate "$1")" ] || [ "$(candidate "$1")" = "(none)" ]; then
        apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed; trying with the package lists at hand"
    fi
}

forbid_service_starts() {  # forbid_service_starts WHO: a policy-rc.d answering 101 until the script exits
    policy=/usr/sbin/policy-rc.d
    backup=""
    if [ -e "$policy" ]; then  # whatever policy was there comes back at exit
        backup=$(mktemp /tmp/policy-rc.d.XXXXXX)
        cp -p "$policy" "$backup"
    fi
    trap restore_policy EXIT
    trap 'exit 1' INT TERM HUP
    printf '#!/bin/sh\n# %s: no service starts during the install\nexit 101\n' "$1" > "$policy"
    chmod 0755 "$policy"
}

restore_policy() {
    if [ -n "$backup" ]; then
        cp -p "$backup" "$policy"
        rm -f "$backup"
    else
        rm -f "$policy"
    fi
}

pids_of() {  # pids_of EXE...: PIDs of running processes whose executable is one of EXE
    for exe in /proc/[0-9]*/exe; do
        target=$(readlink "$exe" 2>/dev/null) || continue
        for want in "$@"; do
            [ "$target" = "$want" ] || continue
            pid=${exe#/proc/}
            echo "${pid%/exe}"
        done
    done
}

end_started() {  # end_started "PIDS BEFORE" EXE...: end the EXE processes that were not running before
    before=" $1 "
    shift
    for pid in $(pids_of "$@"); do
        case "$before" in *" $pid "*) continue ;; esac
        say "ending $(readlink "/proc/$pid/exe" 2>/dev/null) (pid $pid) started by the package install"
        kill -TERM "$pid" 2>/dev/null || true
    done
    left=""
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        left=""
        for pid in $(pids_of "$@"); do
            case "$before" in *" $pid "*) ;; *) left="$left $pid" ;; esac
        done
        [ -z "$left" ] && break
        sleep 0.25
    done
    for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
}
