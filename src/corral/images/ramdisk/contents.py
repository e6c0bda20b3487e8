"""What the deploy ramdisk is made of: its packages (and those left out), the drivers it
loads, the Python modules it keeps, the programs it must have and what it prunes."""

from __future__ import annotations

import re

KERNEL_METAPACKAGE = "linux-image-amd64"
#: The TCP congestion control a node's transfers run on: the ramdisk sets none, so it is
#: the default of Debian's kernel, CUBIC (``CONFIG_DEFAULT_TCP_CONG="cubic"`` in
#: linux-image-6.1.0-57-amd64; BBR is a module it does not load). The testbed gives its
#: nodes the same (:mod:`corral.testbed.cluster`).
KERNEL_TCP_CONGESTION = "cubic"

#: What the ramdisk is made of (their dependencies come along).
PACKAGES: tuple[str, ...] = (
    "busybox-static",  # sh, udhcpc, ip, mount, wget...: the userland
    "kmod",  # modprobe, depmod
    "python3-minimal",  # the agent's interpreter
    "libpython3-stdlib",  # json, http.client, email... (pruned to what the agent imports)
    "udpcast",  # udp-receiver: multicast image transfer
    "rsync",
    "aria2",  # aria2c: BitTorrent image transfer
    "fdisk",  # sfdisk
    "gdisk",  # sgdisk
    "e2fsprogs",  # mkfs.ext4
    "xfsprogs",  # mkfs.xfs
    "dosfstools",  # mkfs.vfat for EFI system partitions
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",  # grub-install
    "tar",  # GNU tar: the image stream keeps xattrs and ACLs (busybox tar drops them)
    "zstd",  # zstd -d: the image stream is zstd-compressed
    "util-linux",  # partx, mkswap -U (busybox's mkswap cannot set a UUID)
    "python3-libtorrent",  # libtorrent: the agent's BitTorrent receiver (receivers.bittorrent)
)

#: Dependencies declared but not needed in a ramdisk: maintainer-script tooling, the
#: full python3 (xfs_scrub_all), data files. apt is told they are installed already.
LEFT_OUT: tuple[str, ...] = (
    "debconf",
    "debianutils",
    "dmsetup",
    "dpkg",
    "init-system-helpers",
    "initramfs-tools",
    "linux-base",
    "media-types",
    "mime-support",
    "perl",
    "perl-base",
    "python3",
    "python3.11",
    "readline-common",
    "tzdata",
    "usr-is-merged",
    "usrmerge",
)

#: Python modules of Debian packages (``/usr/lib/python3/dist-packages``) that the
#: ramdisk keeps, each with the standard-library modules it imports itself (a compiled
#: module's imports are invisible to :mod:`modulefinder`). The agent imports them by
#: name, lazily; the build fails if one does not import with the ramdisk's Python.
DIST_PACKAGES: dict[str, tuple[str, ...]] = {
    "libtorrent": ("datetime",),  # the binding converts times to datetime objects
}

DIST_PACKAGES_DIR = "usr/lib/python3/dist-packages"

#: Programs the ramdisk must have (paths inside it); the build fails without one.
REQUIRED_TOOLS: tuple[str, ...] = (
    "usr/bin/busybox",
    "usr/bin/python3",
    "usr/bin/udp-receiver",
    "usr/bin/rsync",
    "usr/bin/aria2c",
    "usr/sbin/sfdisk",
    "usr/sbin/sgdisk",
    "usr/sbin/mkfs.ext4",
    "usr/sbin/mkfs.xfs",
    "usr/sbin/mkfs.vfat",
    "usr/sbin/grub-install",
    "usr/bin/tar",
    "usr/bin/zstd",
    "usr/bin/partx",
    "usr/sbin/mkswap",
    "usr/sbin/modprobe",
    "usr/bin/corral-agent",
    "init",
)

#: Modules /init loads at every boot: virtio, disks, file systems.
BOOT_MODULES: tuple[str, ...] = (
    # ext4, jbd2 and xfs ask the crypto API for "crc32c" (a soft dependency, not in
    # modules.dep): the generic kernel has it as modules, the cloud one built in
    "crc32c_intel",
    "crc32c_generic",
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    "ahci",
    "ata_piix",
    "xfs",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "efivarfs",
)

#: Modules a diskless node's ramdisk loads besides :data:`BOOT_MODULES`, from the image's
#: kernel: the agent mounts the image's squashfs (through a loop device) under an overlay.
DISKLESS_MODULES: tuple[str, ...] = ("loop", "squashfs", "overlay")

#: NIC and storage drivers for real machines, loaded at boot by PCI modalias when their
#: hardware is present. Those the kernel flavour lacks are logged and skipped.
NIC_MODULES: tuple[str, ...] = (
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "ixgbevf",
    "i40e",
    "ice",
    "bnxt_en",
    "tg3",
    "r8169",
    "mlx4_en",
    "mlx5_core",
    "ena",
    "gve",
    "vmxnet3",
    "hv_netvsc",
    "hv_storvsc",
    "megaraid_sas",
    "mpt3sas",
    "smartpqi",
    "hpsa",
)

#: Standard-library modules kept besides those the agent imports: the codecs Python
#: looks up by name at run time.
EXTRA_STDLIB: tuple[str, ...] = (
    "encodings.aliases",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "runpy",
)

#: Standard-library modules that :mod:`modulefinder` would follow from the agent's imports
#: (through functions the agent never calls) but that the agent does not need. The build
#: runs the agent's code in the pruned tree to prove it
#: (:func:`~corral.images.ramdisk.python.smoke_test`).
STDLIB_EXCLUDES: tuple[str, ...] = (
    "asyncio",
    "bz2",
    "concurrent",
    "ctypes",
    "curses",
    "dbm",
    "decimal",
    "_pydecimal",
    "doctest",
    "ensurepip",
    "fractions",
    "http.cookiejar",
    "http.server",
    "idlelib",
    "importlib.metadata",
    "importlib.resources",
    "lib2to3",
    "lzma",
    "multiprocessing",
    "pdb",
    "pydoc",
    "pydoc_data",
    "sqlite3",
    "statistics",
    "tarfile",
    "test",
    "tkinter",
    "unittest",
    "venv",
    "webbrowser",
    "xmlrpc",
    "zipfile",
)

#: Removed from the tree after unpacking (globs relative to its root).
PRUNE: tuple[str, ...] = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/menu",
    "usr/share/common-licenses",
    "usr/share/gdb",
    "usr/share/python3",
    "usr/share/initramfs-tools",
    "usr/share/aria2",
    "usr/share/apport",
    "usr/share/applications",
    "usr/share/binfmts",
    "usr/share/doc-base",
    "usr/share/gcc",
    "usr/share/java",
    "usr/share/maven-repo",
    "usr/share/pixmaps",
    "usr/include",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/pkgconfig",
    "usr/lib/x86_64-linux-gnu/**/*.a",
    "usr/lib/systemd",
    "usr/lib/udev",
    "usr/lib/cron.d",
    "usr/lib/tmpfiles.d",
    "usr/libexec/e2fsprogs",
    "etc/cron.*",
    "etc/init.d",
    "etc/logrotate.d",
    "etc/systemd",
    "etc/bash_completion.d",
    "var/lib/*",
    "var/cache/*",
    # GRUB programs a deploy does not run (the rescue-image makers, FUSE mount, ...).
    "usr/bin/grub-fstest",
    "usr/bin/grub-mount",
    "usr/bin/grub-mkrescue",
    "usr/bin/grub-mkstandalone",
    "usr/bin/grub-mknetdir",
    "usr/bin/grub-glue-efi",
    "usr/bin/grub-render-label",
    "usr/bin/grub-syslinux2cfg",
    "usr/bin/grub-kbdcomp",
    "usr/bin/grub-menulst2cfg",
    "usr/bin/grub-mklayout",
    "usr/bin/grub-mkfont",
    "usr/sbin/grub-macbless",
    "usr/sbin/grub-sparc64-setup",
    "usr/sbin/grub-ofpathname",
    # Prebuilt EFI images for network and signed boot: grub-install makes its own.
    "usr/lib/grub/x86_64-efi/monolithic",
    # xfsprogs' online scrubber (needs the full python3 and ICU collation).
    "usr/sbin/xfs_scrub",
    "usr/sbin/xfs_scrub_all",
)

#: Libraries programs load with dlopen() (no DT_NEEDED names them): always kept.
DLOPENED = re.compile(r"^(libgcc_s\.so.*|libnss_(files|dns)\.so.*|libresolv\.so.*|ld-linux.*)$")

#: zstd level for the initramfs (the kernel unpacks zstd quickly even in TCG).
ZSTD_LEVEL = 19

AGENT_DIR = "usr/lib/corral-agent"

MULTIARCH = "x86_64-linux-gnu"
LIB_DIRS = (f"usr/lib/{MULTIARCH}", "usr/lib", "usr/lib64")
