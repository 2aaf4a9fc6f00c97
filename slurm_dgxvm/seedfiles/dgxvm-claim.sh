# dgxvm-claim: a warm VM becomes a job's (slurm_dgxvm/lifecycle/warm.py). Run as root by the
# host through the QEMU guest agent (guest-exec: `sh -c "$(seed.sh; this file)" dgxvm-claim`),
# before any tenant code has run in the VM: the host sends the seed readers (seedfiles/seed.sh)
# ahead of this file, so the claim runs the same in the test guest (busybox) and in a Debian
# cloud-init guest (dash), whatever the image has. stdin: one line per file of the job's seed,
# "NAME MODE BASE64" (NAME one of the seed's dgxvm/ files: hostname, user, groups,
# authorized_keys, mounts, dgxvm-guest), written to a root-only directory; then applied as a
# seed is at boot: the hostname, the user and groups, the home, the keys that may log in (where
# the image's sshd reads them: the home's .ssh in the test guest, /etc/ssh/dgxvm/authorized_keys/
# USER in a cloud guest, whose sshd dgxvm's seed configured so), the dgxvm-guest helper, and
# the shares (plugged by the host just before). The key root got at boot is removed wherever it
# is. Prints one line per failure and "claimed" on success; exits non-zero on any failure (the
# host then destroys the VM and starts the job cold).
set -u
umask 022
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
command -v seed_account >/dev/null || { echo "claim: no seed readers sent"; exit 2; }
S=/run/dgxvm-claim
failed=
error() { echo "claim: $*"; failed=1; }

rm -rf "$S" && mkdir -m 700 "$S" || { echo "claim: cannot create $S"; exit 1; }
while read -r name mode data; do
    case $name in
        hostname|user|groups|authorized_keys|mounts|dgxvm-guest) ;;
        *) error "unexpected file '$name'"; continue ;;
    esac
    printf '%s' "$data" | base64 -d > "$S/$name" && chmod "$mode" "$S/$name" \
        || error "cannot write $name"
done
[ -z "$failed" ] || exit 1

read -r name < "$S/hostname" || { echo "claim: no hostname"; exit 1; }
hostname "$name" || error "cannot set hostname $name"
echo "$name" > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost\n' "$name" > /etc/hosts

read -r user uid gid home < "$S/user" || { echo "claim: no user"; exit 1; }
user=$(pct_decode "$user") && home=$(pct_decode "$home")
seed_account "$user" "$uid" "$gid" "$home" || { echo "claim: cannot add user $user"; exit 1; }
supp=
while read -r gname ggid; do
    [ -n "$gname" ] || continue
    seed_group "$(pct_decode "$gname")" "$ggid" "$user" || error "cannot add $user to group $ggid"
    supp="$supp $ggid"
done < "$S/groups"
# shellcheck disable=SC2086  # gids: digits only
seed_subids "$user" $supp || error "cannot write /etc/subuid and /etc/subgid for $user"
if [ ! -d "$home" ]; then
    mkdir -p "$home" && chown "$uid:$gid" "$home" && chmod 755 "$home" \
        || { echo "claim: cannot create $home"; exit 1; }
fi
: > /root/.ssh/authorized_keys 2>/dev/null
KEYS=/etc/ssh/dgxvm/authorized_keys          # a cloud guest's (slurm_dgxvm/seed.py SSH_DIR)
if [ -d "$KEYS" ]; then
    : > "$KEYS/root" 2>/dev/null
    cp "$S/authorized_keys" "$KEYS/.new" && chmod 644 "$KEYS/.new" \
        && mv -f "$KEYS/.new" "$KEYS/$user" || error "cannot install $KEYS/$user"
else
    mkdir -p "$home/.ssh" && cp "$S/authorized_keys" "$home/.ssh/authorized_keys" \
        && chown -R "$uid:$gid" "$home/.ssh" && chmod 700 "$home/.ssh" \
        && chmod 600 "$home/.ssh/authorized_keys" || error "cannot install authorized_keys"
fi
mkdir -p /usr/lib/dgxvm && cp "$S/dgxvm-guest" /usr/lib/dgxvm/dgxvm-guest.new \
    && chmod 755 /usr/lib/dgxvm/dgxvm-guest.new \
    && mv /usr/lib/dgxvm/dgxvm-guest.new /usr/lib/dgxvm/dgxvm-guest \
    || error "cannot install /usr/lib/dgxvm/dgxvm-guest"

while read -r tag path fstype mode; do
    [ -n "$tag" ] || continue
    path=$(pct_decode "$path")
    opts=$(share_options "$fstype" "$mode") || { error "share $tag: bad fstype or mode"; continue; }
    mkdir -p "$path" || { error "cannot create mount point $path"; continue; }
    mount -t "$fstype" -o "$opts" "$tag" "$path" \
        || { error "cannot mount $fstype share $tag on $path"; continue; }
    echo "$path" >> /run/dgxvm-mounts
done < "$S/mounts"
rm -rf "$S"
[ -z "$failed" ] || exit 1
echo claimed
