"""The job's work dir, shared into its VM so that guest root gets no more than the job's user.

The job's user is root inside its own VM (production guest images give sudo). Debian 12's C
virtiofsd, as libvirt 9.0 runs it, is root on the host with no uid translation: guest root on a
``passthrough`` share is host root in that directory (a setuid-root file, a device node, reading
what the user cannot). So dgxvm serves the share differently:

* policy.py -- what may be shared at all: under an admin's ``vm.share_roots``, opened *as the
  job's user* one component at a time with no symlink followed (root-squashed NFS homes and group
  project directories work), decided before anything is allocated.
* virtiofsd.py -- the program libvirt runs as the share's virtiofsd (``<binary path=...>`` in the
  domain, one small wrapper script per VM): it opens the directory again as the user (the same
  checks; the directory must be the one the Prolog checked, by device and inode), enters a user
  namespace in which only the user's uid and groups exist, becomes the user, keeps the few
  capabilities virtiofsd needs *inside that namespace only*, installs a seccomp filter that
  refuses setuid/setgid mode bits, and execs virtiofsd on ``/proc/self/fd/N`` with
  ``sandbox=chroot``.
* userns.py, seccomp.py -- the two kernel mechanisms, through ctypes (no new dependency).

What guest root gets on the share: its requests as uid 0 fail (uid 0 does not exist in the
namespace); files the guest's user (same uid as on the host) creates are the user's; no
setuid/setgid bit can be set, no device node made (mknod of a device needs CAP_MKNOD in the
initial namespace), no file read that the user could not read, no file owned by anyone but the
user's ids.
"""
