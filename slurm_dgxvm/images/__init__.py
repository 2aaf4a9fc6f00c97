"""The guest image store: installed OS disk images, and the per-VM disks made from them.

``dgxvm image show|install|remove`` (after ``nvidia-vm image show|install``) manage a directory of
images; the VM designer asks the store for an :class:`Image` (the *profile*: disk, format, sizes,
boot method) and makes each VM's OS disk with :func:`create_overlay`.

The modules, each importing only those above it:

* :mod:`.qemu_img`  the qemu-img adapter: ``info``, ``check``, ``create``; ``QEMU_IMG``, time-outs
* :mod:`.sniff`     a file read without qemu-img: readable regular file? raw disk? allocation
* :mod:`.copy`      the chunked, sparse copy with its sha256
* :mod:`.profile`   :class:`Image`, :class:`BrokenImage` and ``image.json`` (read and write)
* :mod:`.accept`    which files are images dgxvm takes: :func:`image_info`, :func:`check_qcow2`
* :mod:`.manifest`  where an install comes from: a disk file or a builder manifest; versions
* :mod:`.disks`     per-VM disks: :func:`create_overlay`, :func:`create_disk`
* :mod:`.store`     :class:`ImageStore`: list, get, default, install, remove, sweep
"""

from .accept import check_qcow2, image_info
from .disks import create_disk, create_overlay
from .profile import BrokenImage, Image, human_bytes
from .store import ImageStore

__all__ = ["BrokenImage", "Image", "ImageStore", "check_qcow2", "create_disk", "create_overlay",
           "human_bytes", "image_info"]
