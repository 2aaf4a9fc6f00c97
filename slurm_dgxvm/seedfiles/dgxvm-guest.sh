#!/bin/sh
# dgxvm-guest: the guest side of `dgxvm run` and `dgxvm shell` (slurm_dgxvm/access/).
#
# Arrives with the NoCloud seed (the test guest's init and cloud-init's write_files put it at
# /usr/lib/dgxvm/dgxvm-guest), runs as the job's user through ssh with the job's key: no other
# account can log in, so only the job's user (and root) can use it. POSIX sh and the tools every
# image has (busybox or coreutils/util-linux: base64, setsid, sleep, kill, mkdir, rm).
#
# One `dgxvm run` is two ssh sessions sharing a run ID (16+ hex digits):
#
#   dgxvm-guest control ID   first line on stdin: the request, a base64'd sh script written by
#                            the host (exports, cd, `set -- argv`; values single-quoted, so
#                            nothing is re-parsed). Then one line per signal name to forward to
#                            the command's process group (TERM INT HUP USR1 USR2 QUIT), or
#                            STATUS (answered "status N" or "status none"). EOF means the host
#                            side ended: if the command still runs, its process group gets TERM,
#                            then KILL after DGXVM_GRACE seconds (default 5).
#   dgxvm-guest run ID       waits for the control session, then runs the command in a session
#                            (and process group) of its own with this session's stdin, stdout and
#                            stderr; exits with its status (128+N when killed by signal N) after
#                            stopping what it left in its group. Never starts a command whose
#                            control session has already gone.
#   dgxvm-guest shell ID     like run, for a login shell (under the ssh session's terminal, if
#                            any): the request sets the cwd and environment.
#
# State: /tmp/.dgxvm-UID/ID/ (request, attached, pgid, status, gone), removed by the control
# session when it ends; /tmp/.dgxvm-UID/ID.gone when it ended before the run session started.
set -u
umask 077
GRACE=${DGXVM_GRACE:-5}
base=/tmp/.dgxvm-$(id -u)

say() { echo "dgxvm-guest: $*" >&2; }

check_id() {
    case $1 in
        ''|*[!0-9a-f]*) say "bad run id '$1'"; exit 125 ;;
    esac
    [ ${#1} -ge 16 ] || { say "bad run id '$1'"; exit 125; }
}

setup_dir() {
    mkdir -p "$base" && chmod 700 "$base" && mkdir -p "$d" \
        || { say "cannot create $d"; exit 125; }
}

# group_alive PGID: whether any process is left in the process group
group_alive() { kill -0 "-$1" 2>/dev/null; }

# stop_group PGID: TERM, then KILL after GRACE seconds if anything is left; then the request's
# cleanup, if it has one (a container runtime's delete: a container's processes may live in
# a session of their own, and a container's PID 1 ignores a TERM it has no handler for)
stop_group() {
    if kill -TERM "-$1" 2>/dev/null; then
        n=0
        while group_alive "$1"; do
            n=$((n + 1))
            [ $n -gt $((GRACE * 10)) ] && { kill -KILL "-$1" 2>/dev/null; break; }
            sleep 0.1
        done
    fi
    [ -s "$d/cleanup" ] && sh "$d/cleanup" >/dev/null 2>&1
    return 0
}

read_request() {
    IFS= read -r req || { say "no request"; rm -rf "$d"; exit 125; }
    printf '%s' "$req" | base64 -d > "$d/request.tmp" 2>/dev/null \
        && mv "$d/request.tmp" "$d/request" \
        || { say "the request is not base64"; rm -rf "$d"; exit 125; }
}

cmd_control() {
    setup_dir
    read_request
    : > "$d/attached"
    while IFS= read -r line; do
        case $line in
            STATUS)
                if [ -s "$d/status" ]; then echo "status $(cat "$d/status")"
                else echo "status none"; fi ;;
            TERM|INT|HUP|USR1|USR2|QUIT)
                n=0   # a signal sent before the command started waits for it (up to 10 s)
                while [ ! -s "$d/pgid" ] && [ ! -e "$d/status" ] && [ $n -lt 100 ]; do
                    n=$((n + 1)); sleep 0.1
                done
                [ -s "$d/pgid" ] && kill "-$line" "-$(cat "$d/pgid")" 2>/dev/null ;;
        esac
    done
    # EOF: the host side is done, or gone (dgxvm run killed, connection lost)
    : > "$d/gone"
    if [ -s "$d/pgid" ] && [ ! -e "$d/status" ]; then
        stop_group "$(cat "$d/pgid")"
        n=0   # let the run session record the status before the directory goes
        while [ ! -e "$d/status" ] && [ $n -lt 50 ]; do n=$((n + 1)); sleep 0.1; done
    fi
    # A run session that has not started yet must not wait for a control session that has
    # come and gone: it finds this tombstone (and removes it). A run starting right now fails
    # to record its pgid in the removed directory and never runs the command.
    [ -e "$d/pgid" ] || : > "$base/$id.gone"
    rm -rf "$d"
}

# The run session can arrive before the control session has stored the request, which then
# follows within milliseconds: the first checks come quickly (5 ms), the later ones slower.
wait_attached() {
    n=0
    while [ ! -e "$d/attached" ]; do
        n=$((n + 1))
        [ $n -gt 620 ] && { say "no control session after 30 s"; exit 125; }
        [ -e "$d/gone" ] && exit 125
        [ -e "$base/$id.gone" ] && { rm -f "$base/$id.gone"; exit 125; }
        if [ $n -le 20 ]; then sleep 0.005; else sleep 0.05; fi
    done
}

cmd_run() {
    wait_attached
    # In the foreground, not as "cmd &": an asynchronous list of a shell without job control
    # starts with SIGINT and SIGQUIT ignored, and the command could never be interrupted.
    # setsid does not fork here (this shell's child is no group leader), so the inner sh's $$
    # is the new session's and process group's id; it is recorded before the command runs.
    # The request (the job's exports, cd, argv) is sourced there too, never in this shell: a
    # job variable named like one of this script's own (d, GRACE) changes nothing here.
    setsid sh -c 'echo "$$" > "$1/pgid" || exit 125; [ -e "$1/gone" ] && exit 125
        . "$1/request" || exit 125; exec "$@"' dgxvm-guest "$d"
    rc=$?
    pid=$(cat "$d/pgid" 2>/dev/null)
    [ -n "$pid" ] && group_alive "$pid" && stop_group "$pid"
    # the request's cleanup, always: a container runtime may leave processes in sessions of
    # their own (podman's conmon and its exit command), which the group's end does not stop
    [ -s "$d/cleanup" ] && sh "$d/cleanup" >/dev/null 2>&1
    [ -s "$d/runtime.log" ] && runtime_status

    echo "$rc" > "$d/status.tmp" && mv "$d/status.tmp" "$d/status"
    exit "$rc"
}

# runtime_status: a container runtime's own errors (runc --log: its stderr stays the
# command's), shown on stderr; one that says the command could not be found or executed makes
# the status 127 or 126, as a shell's would be, instead of the runtime's 1
runtime_status() {
    sed -n -e 's/^.*level=error msg="\(.*\)"$/dgxvm-guest: \1/p' \
        -e 's/^.*level=fatal msg="\(.*\)"$/dgxvm-guest: \1/p' "$d/runtime.log" \
        | sed 's/\\"/"/g' >&2
    [ "$rc" = 1 ] || return 0
    if grep -q -e 'executable file not found' -e 'exec: .*no such file or directory' \
            "$d/runtime.log"; then
        rc=127
    elif grep -q 'exec: .*permission denied' "$d/runtime.log"; then
        rc=126
    fi
}

cmd_shell() {
    wait_attached
    echo "$$" > "$d/pgid.tmp" && mv "$d/pgid.tmp" "$d/pgid"
    set +u
    set -- "$d"    # the request knows the run's directory as $1
    # shellcheck disable=SC1090,SC1091
    . "$d/request" || { say "cannot read the request"; exit 125; }
    exec "${SHELL:-/bin/sh}" -l
}

# subid FILE NAME: the start of NAME's first range of more than one id in /etc/subuid or
# /etc/subgid (the seed writes one)
subid() {
    n=$2 awk -F: '$1 == ENVIRON["n"] && $3 > 1 { print $2; exit }' "$1" 2>/dev/null
}

# dgxvm-guest userns GIDS LOWER TARGET NAME CMD...: CMD (a container runtime) in a new user
# namespace where this user is root (0) and one subordinate uid and gid exist as 1, each
# supplementary gid of GIDS (comma-separated, "-" for none) as 2, 3, ...: a runtime there can
# run the container as the user's own uid with its groups, its root being the subordinate ids
# (runc needs a root in the container and the user's uid besides, which an unprivileged
# namespace of one id cannot give). newuidmap/newgidmap (shadow's uidmap) write the maps from a
# helper process; CMD starts only once they are written, in the foreground (the same pid:
# signals and the process group stay). It gets a mount namespace of its own too, owned by the
# new user namespace: runc 1.1 enters its own ("host") mount namespace to open bind mount
# sources, which it may only do there.
#
# LOWER ("-" for none): a writable container root: an overlay of the image's read-only rootfs
# LOWER on TARGET, its writable layer on the guest's disk under $layers: kept as
# $layers/NAME for a named container (used by one run at a time, kept until the VM ends), or
# made for this run (NAME "-") and removed when CMD ends. $layers is named by the user's own
# uid, taken here: inside the namespace `id -u` is 0 once mapped (65534 before), so
# userns-inner gets it as an argument.
cmd_userns() {
    gids=$1 lower=$2 target=$3 name=$4; shift 4
    set -f    # GIDS is split on commas, never globbed
    supp=
    if [ "$gids" != - ]; then
        for g in $(echo "$gids" | tr , ' '); do
            case $g in ''|*[!0-9]*) say "bad gid '$g'"; exit 125 ;; esac
            supp="$supp $g"
        done
    fi
    case $name in
        -) ;;
        ''|.*|*[!A-Za-z0-9_.-]*) say "bad container name '$name'"; exit 125 ;;
    esac
    for t in newuidmap newgidmap; do
        command -v "$t" >/dev/null 2>&1 || {
            say "$t is not installed: this image cannot run a container as your own uid" \
                "(it needs shadow's uidmap; --container-remap-root works without it)"
            exit 125; }
    done
    name_=$(id -un) && uid=$(id -u) && gid=$(id -g) || { say "who am I?"; exit 125; }
    su=$(subid /etc/subuid "$name_"); sg=$(subid /etc/subgid "$name_")
    [ -n "$su" ] && [ -n "$sg" ] || {
        say "no subordinate uid/gid range for $name_ in /etc/subuid or /etc/subgid"; exit 125; }
    gmap="0 $gid 1 1 $sg 1"
    i=2
    for g in $supp; do gmap="$gmap $i $g 1"; i=$((i + 1)); done
    me=$$
    outer=$(readlink /proc/self/ns/user)
    mkdir -p "$base" && chmod 700 "$base" || { say "cannot create $base"; exit 125; }
    failed=$base/userns-$me.failed
    rm -f "$failed"
    # the mapper: waits for this process to be in its new namespace, then writes the maps
    (
        n=0
        while [ "$(readlink "/proc/$me/ns/user" 2>/dev/null)" = "$outer" ]; do
            n=$((n + 1)); [ $n -gt 500 ] && exit 1; sleep 0.01
        done
        # shellcheck disable=SC2086  # gmap: numbers only
        newuidmap "$me" 0 "$uid" 1 1 "$su" 1 && newgidmap "$me" $gmap || : > "$failed"
    ) < /dev/null > /dev/null &
    exec unshare -U -m sh "$0" userns-inner "$failed" "/var/tmp/.dgxvm-$uid" "$lower" "$target" \
        "$name" "$@"
}

# the inside of userns: once mapped, the writable layer (if any), then CMD
cmd_userns_inner() {
    failed=$1 layers=$2 lower=$3 target=$4 name=$5; shift 5
    n=0
    while [ "$(id -u)" != 0 ] || [ "$(id -g)" != 0 ]; do
        n=$((n + 1))
        if [ $n -gt 1000 ] || { [ -e "$failed" ] && rm -f "$failed"; }; then
            say "newuidmap/newgidmap did not map the container's user namespace (see above)"
            exit 125
        fi
        sleep 0.01
    done
    [ "$lower" = - ] && exec "$@"
    mkdir -p "$layers" && chmod 700 "$layers" || { say "cannot create $layers"; exit 125; }
    if [ "$name" = - ]; then
        layer=$layers/run-$$
    else
        layer=$layers/$name
        # one run at a time: a lock directory holding the pid of the run that has it
        if ! mkdir "$layer.lock" 2>/dev/null; then
            holder=$(cat "$layer.lock/pid" 2>/dev/null)
            if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then
                say "container $name is in use by another dgxvm run in this job (pid $holder);" \
                    "a named container serves one run at a time"
                exit 125
            fi
        fi
        echo $$ > "$layer.lock/pid" || { say "cannot lock container $name"; exit 125; }
        if [ -s "$layer/image" ] && [ "$(cat "$layer/image")" != "$lower" ]; then
            say "container $name was made from another image ($(cat "$layer/image"))"
            exit 125
        fi
    fi
    mkdir -p "$layer/upper" "$layer/work" "$target" && printf '%s\n' "$lower" > "$layer/image" \
        || { say "cannot make the container's writable layer in $layer"; exit 125; }
    mount -t overlay overlay \
        -o "lowerdir=$lower,upperdir=$layer/upper,workdir=$layer/work,userxattr" "$target" \
        || { say "cannot mount a writable layer over the image (overlayfs in a user" \
                 "namespace needs Linux 5.11)"; [ "$name" = - ] && rm -rf "$layer"; exit 125; }
    [ "$name" = - ] || exec "$@"
    # an unnamed layer goes when CMD ends: this shell stays to remove it (as root of this
    # namespace, which owns what the container's root wrote there); the signals meant for CMD
    # reach it through the process group, and are only noted here
    trap : TERM INT HUP USR1 USR2 QUIT
    "$@"
    rc=$?
    umount "$target" 2>/dev/null
    # in a child sh, not this one: this shell was exec'd before its namespace was mapped, so
    # it has no capabilities there, and busybox runs rm inside the shell (a NOFORK applet);
    # overlayfs's work/work is mode 000, which only a process with them can remove
    sh -c 'rm -rf "$1"' dgxvm-guest "$layer"
    exit "$rc"
}

verb=${1:-}
case $verb in
    userns)
        [ $# -ge 6 ] || { say "usage: dgxvm-guest userns GIDS LOWER TARGET NAME CMD..."; exit 125; }
        shift
        cmd_userns "$@" ;;
    userns-inner)
        shift
        cmd_userns_inner "$@" ;;
    run|control|shell)
        [ $# -eq 2 ] || { say "usage: dgxvm-guest $verb ID"; exit 125; }
        check_id "$2"
        id=$2
        d=$base/$id
        "cmd_$verb" ;;
    *) say "usage: dgxvm-guest run|control|shell ID | userns GIDS LOWER TARGET NAME CMD..."
       exit 125 ;;
esac
