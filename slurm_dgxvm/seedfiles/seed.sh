# The readers of the NoCloud seed's plain dgxvm/ files (slurm_dgxvm/seed.py writes them), for
# busybox sh and dash. The test guest has them as /usr/lib/dgxvm/seed.sh (guest-image/build.py
# installs this file), which its /sbin/dgxvm-init sources at boot; a warm VM's claim sends them
# ahead of seedfiles/dgxvm-claim.sh, so that a guest without them (a cloud-init image) runs the
# same. tests/unit/test_seed.py sources it too, with ETC pointing at a scratch directory, and
# runs it with the guest's own busybox and with dash.
#
# Values come from the host unchanged: a user "john.doe", a group "Domain Users", a home or
# share path with spaces, quotes, '$' or non-ASCII letters. Fields that may hold such bytes are
# percent-encoded in the files (seed.py pct: every byte outside A-Za-z0-9._/- is %HH), so
# `read -r` splits lines on whitespace safely. awk gets values through ENVIRON, never -v (which
# would interpret backslashes) and never inside its program text.
ETC=${ETC:-/etc}

# pct_decode FIELD: the text of a percent-encoded field. No backslash survives the encoding,
# so printf %b sees only the escapes made here: \0 and three octal digits per %HH, which
# busybox's and dash's printf both read (dash has no \x).
pct_decode() {
    _s=$1 _r=
    while :; do
        case $_s in
            *%*) _r=$_r${_s%%\%*}; _s=${_s#*\%}; _h=${_s%"${_s#??}"}; _s=${_s#??}
                 _r=$_r\\0$(printf '%03o' "0x$_h") ;;
            *) printf '%b' "$_r$_s"; return ;;
        esac
    done
}

# seed_account NAME UID GID HOME: passwd, shadow and (when no group has GID) group entries
# for the user; nothing when a user of that name exists (a later boot, root).
seed_account() {
    if n=$1 awk -F: '$1 == ENVIRON["n"] { f = 1 } END { exit !f }' "$ETC/passwd"; then
        return 0
    fi
    g=$3 awk -F: '$3 == ENVIRON["g"] { f = 1 } END { exit !f }' "$ETC/group" \
        || printf '%s:x:%s:\n' "$1" "$3" >> "$ETC/group" || return 1
    printf '%s:x:%s:%s::%s:/bin/sh\n' "$1" "$2" "$3" "$4" >> "$ETC/passwd" || return 1
    printf '%s:*:1::::::\n' "$1" >> "$ETC/shadow"
}

# seed_group NAME GID USER: USER becomes a member of the group GID. A group with that gid
# keeps its name (the gid is what files on a share carry); a new one is called NAME, or gGID
# when the image already has another group called NAME.
seed_group() {
    if g=$2 awk -F: '$3 == ENVIRON["g"] { f = 1 } END { exit !f }' "$ETC/group"; then
        g=$2 u=$3 awk -F: -v OFS=: '
            $3 == ENVIRON["g"] {
                n = split($4, m, ",")
                for (i = 1; i <= n; i++) if (m[i] == ENVIRON["u"]) { print; next }
                $4 = ($4 == "" ? ENVIRON["u"] : $4 "," ENVIRON["u"])
            }
            { print }' "$ETC/group" > "$ETC/group.dgxvm" \
            && cat "$ETC/group.dgxvm" > "$ETC/group" && rm -f "$ETC/group.dgxvm"
        return
    fi
    name=$1
    if n=$1 awk -F: '$1 == ENVIRON["n"] { f = 1 } END { exit !f }' "$ETC/group"; then
        name=g$2
    fi
    printf '%s:x:%s:%s\n' "$name" "$2" "$3" >> "$ETC/group"
}

# seed_subids NAME GID...: subordinate ids for `dgxvm run --container-image` (the container
# runs as the user's own uid; its root is a subordinate uid, newuidmap/newgidmap make the
# mapping): NAME gets SUBID_COUNT uids and gids from SUBID_START (ids no account of a site
# uses; only the VM's kernel ever sees them: a share refuses them) unless it has a range, and
# each GID (the user's supplementary groups) as a one-id range, so that the container keeps
# them. Idempotent (a later boot adds nothing).
SUBID_START=3000000000
SUBID_COUNT=65536
seed_subids() {
    n=$1; shift
    for f in subuid subgid; do
        [ -e "$ETC/$f" ] || { : > "$ETC/$f" && chmod 644 "$ETC/$f"; } || return 1
        n=$n awk -F: '$1 == ENVIRON["n"] && $3 > 1 { f = 1 } END { exit !f }' "$ETC/$f" \
            || printf '%s:%s:%s\n' "$n" "$SUBID_START" "$SUBID_COUNT" >> "$ETC/$f" || return 1
    done
    for g in "$@"; do
        n=$n g=$g awk -F: '$1 == ENVIRON["n"] && $2 == ENVIRON["g"] && $3 == 1 { f = 1 }
                           END { exit !f }' "$ETC/subgid" \
            || printf '%s:%s:1\n' "$n" "$g" >> "$ETC/subgid" || return 1
    done
}

# share_options FSTYPE [MODE]: the mount options of a dgxvm/mounts line "tag path fstype [ro]":
# nosuid,nodev always (a setuid file or device node on a share is not honoured in the guest),
# ro before them for a read-only share (MODE "ro"; "" or "rw": read-write), 9p's transport
# options for 9p. Fails, printing nothing, for another fstype or mode.
share_options() {
    case "$2" in
        ""|rw) o=nosuid,nodev ;;
        ro) o=ro,nosuid,nodev ;;
        *) return 1 ;;
    esac
    case "$1" in
        virtiofs) printf '%s\n' "$o" ;;
        9p) printf '%s\n' "$o,trans=virtio,version=9p2000.L,msize=262144" ;;
        *) return 1 ;;
    esac
}

# seed_fabric MAC ADDRESS/PREFIX MTU: a multi-node job's fabric NIC (the dgxvm/fabric line):
# the NIC whose MAC is MAC (under $SYS/class/net) gets MTU and ADDRESS and comes up. Prints
# the interface's name. Fails when no NIC has that MAC or ip refuses. ($IP: the tests' stand-in;
# busybox sh runs its own applet before anything in PATH.)
SYS=${SYS:-/sys}
IP=${IP:-ip}
seed_fabric() {
    i=
    for d in "$SYS"/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && i=${d##*/}
    done
    [ -n "$i" ] || return 1
    "$IP" link set "$i" mtu "$3" && "$IP" addr replace "$2" dev "$i" && "$IP" link set "$i" up \
        && printf '%s\n' "$i"
}

# seed_hosts FILE: the job's node names ("address name" lines of dgxvm/hosts) into
# $ETC/hosts, so Slurm's node names resolve to the job's VMs on its fabric.
seed_hosts() {
    while read -r addr name; do
        [ -n "$name" ] || continue
        printf '%s\t%s\n' "$addr" "$name" >> "$ETC/hosts" || return 1
    done < "$1"
}
