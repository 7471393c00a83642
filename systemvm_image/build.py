"""Builds the sysvm system VM image: one image for every role.

Two cached layers, each keyed by the hash of its inputs:

1. **base** (``cache/base-<hash>.tar``): ``mmdebstrap`` of Debian with the packages in
   ``packages.txt`` and the initrd configuration. Rebuilt only when the package list or this
   recipe changes.
2. **image** (``<image id>/``): the base unpacked, the project wheel installed into
   ``/opt/sysvm/venv`` *inside* the image root (``systemd-nspawn``, so wheels match the
   image's python), the files under ``files/`` copied in, hardening applied. Outputs:
   ``rootfs/`` (containers), ``disk.img`` (raw ext4, bootable with ``vmlinuz`` +
   ``initrd.img``), ``manifest.json`` (version, hashes, sizes, build time).

``<out>/current`` is a symlink to the newest image; it is swapped atomically, and older
images are removed only when no overlay mount still uses them.
Usage: ``scripts/build-image [--out DIR] [--force] [--keep N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUITE = "trixie"  # Debian 13, current stable (checked against deb.debian.org, Nov 2026)
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
RECIPE_VERSION = "3"  # bump to force a base rebuild after changing the recipe below
VENV = "/opt/sysvm/venv"
AGENT_UNIT = REPO / "agent" / "units" / "sysvm-agent.service"

# What dpkg never unpacks: documentation, translations and kernel drivers a VM has no use
# for (GPU, sound, wireless, media, ...). Saves ~300 MB; the package database stays honest.
DPKG_EXCLUDES = (
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/doc/*",
    "/usr/share/lintian/*",
    *(
        f"/usr/lib/modules/*/kernel/{d}/*"
        for d in (
            "drivers/gpu",
            "drivers/media",
            "drivers/net/wireless",
            "drivers/net/ethernet",
            "drivers/net/can",
            "drivers/infiniband",
            "drivers/staging",
            "drivers/bluetooth",
            "drivers/iio",
            "drivers/isdn",
            "drivers/mtd",
            "drivers/thunderbolt",
            "drivers/usb",
            "drivers/input/touchscreen",
            "drivers/hwmon",
            "drivers/mmc",
            "drivers/nfc",
            "drivers/platform",
            "drivers/fpga",
            "drivers/comedi",
            "sound",
            "net/bluetooth",
            "net/wireless",
            "net/mac80211",
            "fs/ocfs2",
            "fs/gfs2",
            "fs/xfs",
            "fs/btrfs",
        )
    ),
)
DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)

# Units shipped by Debian packages that must not run until a role enables them.
ROLE_DAEMONS = ("dnsmasq.service", "haproxy.service", "apache2.service", "ssh.service")
# Units an appliance does not need at all (no interactive logins: root is locked).
MASKED = (
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
    "sshd-unix-local.socket",  # systemd-ssh-generator: no SSH over AF_UNIX/vsock either
    "sshd-vsock.socket",
)


class BuildError(RuntimeError):
    pass


def log(event: str, **kv: object) -> None:
    parts = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"build-image: {event} {parts}".rstrip(), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pure: inputs and hashes


def parse_packages(text: str) -> list[str]:
    """Package names from packages.txt: first word of each line, ``#`` starts a comment."""
    names: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if " " in word or not all(c.isalnum() or c in "+-.:" for c in word):
            raise BuildError(f"packages.txt:{lineno}: not a package name: {word!r}")
        names.append(word)
    if len(set(names)) != len(names):
        raise BuildError("packages.txt: duplicate package")
    return names


def hash_files(paths: Iterable[tuple[str, bytes]], *extra: str) -> str:
    h = hashlib.sha256()
    for e in extra:
        h.update(e.encode() + b"\0")
    for name, data in sorted(paths):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _walk(root: Path, rel_to: Path) -> Iterator[tuple[str, bytes]]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            mode = p.stat().st_mode & 0o777
            yield f"{p.relative_to(rel_to)}:{mode:o}", p.read_bytes()


def base_inputs() -> list[tuple[str, bytes]]:
    return [
        ("packages.txt", (HERE / "packages.txt").read_bytes()),
        ("initramfs-modules", (HERE / "initramfs-modules").read_bytes()),
    ]


def base_hash() -> str:
    return hash_files(base_inputs(), SUITE, MIRROR, RECIPE_VERSION, *DPKG_EXCLUDES, *DPKG_INCLUDES)


# What the image runs: the agent and the protocol (the manager never runs in a system VM, so
# its code is left out of the image's wheel and its edits do not rebuild the image).
SOURCE_DIRS = ("protocol", "agent", "systemvm_image")
SOURCE_FILES = ("pyproject.toml", "constraints.txt", "scripts/build-image", "package-lock.json")
# noVNC (npm, pinned by package-lock.json) for the console proxy's page: the library files the
# page imports, copied from node_modules at build time, never committed to the repo.
NOVNC_SRC = REPO / "node_modules" / "@novnc" / "novnc"
NOVNC_PARTS = ("core", "vendor", "package.json", "LICENSE.txt")
NOVNC_DST = "usr/share/sysvm/novnc"


def install_novnc(rootfs: Path) -> None:
    """Copies the pinned noVNC library into the image (``scripts/setup`` runs ``npm ci``)."""
    if not (NOVNC_SRC / "core").is_dir():
        raise SystemExit(
            f"build-image: {NOVNC_SRC} is missing: run scripts/setup (it runs npm ci) first"
        )
    dst = rootfs / NOVNC_DST
    dst.mkdir(parents=True, exist_ok=True)
    for part in NOVNC_PARTS:
        src = NOVNC_SRC / part
        if src.is_dir():
            shutil.copytree(src, dst / part, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copyfile(src, dst / part)


def source_files() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for d in SOURCE_DIRS:
        out.extend(_walk(REPO / d, REPO))
    for f in SOURCE_FILES:
        p = REPO / f
        if p.exists():
            out.append((f, p.read_bytes()))
    return out


def image_hash(base: str, sources: Sequence[tuple[str, bytes]]) -> str:
    return hash_files(sources, base, VENV)


def missing_from_wheel(sources: Sequence[tuple[str, bytes]], names: Iterable[str]) -> list[str]:
    """Source files of the agent/protocol packages that the wheel does not carry."""
    inside = set(names)
    out = []
    for name, _ in sources:
        rel = name.rsplit(":", 1)[0]
        if rel.split("/", 1)[0] in ("agent", "protocol") and rel not in inside:
            out.append(rel)
    return sorted(out)


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def release_text(version: str, image_id: str) -> str:
    """``/etc/sysvm-release``: one line, the image version (``<project version>+<id>``)."""
    return f"{version}+{image_id}\n"


def mmdebstrap_argv(packages: Sequence[str], out_tar: Path, staging: Path) -> list[str]:
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        "--format=tar",
        "--aptopt=APT::Install-Recommends false",
        "--dpkgopt=force-confold",
        "--dpkgopt=force-confdef",
        *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
        *(f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES),
        f"--include={','.join(packages)}",
        # the initrd configuration must exist before linux-image is installed
        f'--essential-hook=mkdir -p "$1/etc/initramfs-tools/conf.d" && '
        f'cp {staging}/modules "$1/etc/initramfs-tools/modules" && '
        f'cp {staging}/sysvm.conf "$1/etc/initramfs-tools/conf.d/sysvm.conf"',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
        SUITE,
        str(out_tar),
        f"deb {MIRROR} {SUITE} main",
        f"deb {MIRROR} {SUITE}-updates main",
        f"deb {SECURITY_MIRROR} {SUITE}-security main",
    ]
    return argv


def in_root_steps(wheel_name: str) -> list[list[str]]:
    """Commands run inside the image root (one nspawn call, joined by the runner)."""
    pip = f"{VENV}/bin/pip"
    return [
        ["python3", "-m", "venv", VENV],
        [
            pip,
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-c",
            "/var/tmp/sysvm-build/constraints.txt",
            f"/var/tmp/sysvm-build/{wheel_name}",
        ],
        ["systemctl", "set-default", "multi-user.target"],
        ["systemctl", "enable", "sysvm-agent.service", "sysvm-netcfg.service"],
        ["systemctl", "disable", *ROLE_DAEMONS],
        ["systemctl", "mask", *MASKED],
        # Ctrl-Alt-Del powers off (a hypervisor's clean "stop" without ACPI/logind/dbus:
        # QEMU sends the key over QMP; systemd gets it as SIGINT)
        [
            "ln",
            "-sf",
            "/usr/lib/systemd/system/poweroff.target",
            "/etc/systemd/system/ctrl-alt-del.target",
        ],
        ["passwd", "--lock", "root"],
        ["usermod", "--shell", "/usr/sbin/nologin", "root"],
    ]


@dataclass
class Manifest:
    image_id: str
    version: str
    base_hash: str
    image_hash: str
    suite: str
    kernel: str
    build_seconds: float
    rootfs_bytes: int
    disk_bytes: int
    disk_allocated_bytes: int


# ---------------------------------------------------------------- I/O


async def run(
    argv: Sequence[str],
    *,
    timeout: float,  # noqa: ASYNC109 - one deadline over output pumping and exit
    echo: bool = False,
    env: dict[str, str] | None = None,
) -> str:
    """Runs argv; raises BuildError with argv, exit code and stderr tail on failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    tail: list[str] = []
    out: list[str] = []

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            out.append(line)
            tail.append(line)
            del tail[:-25]
            if echo and line:
                print(f"  | {line[:160]}", file=sys.stderr, flush=True)

    try:
        await asyncio.wait_for(pump(), timeout)
        rc = await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BuildError(f"timed out after {timeout:.0f} s: {list(argv)}") from None
    if rc != 0:
        raise BuildError(f"command failed rc={rc} argv={list(argv)}\n" + "\n".join(tail))
    return "\n".join(out)


def du_bytes(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def copy_tree(src: Path, dst: Path) -> None:
    """Copies ``files/`` into the image root: directories 0755, files keep their mode."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        target = dst / rel
        if p.is_dir():
            target.mkdir(mode=0o755, exist_ok=True)
        else:
            if target.is_symlink() or target.exists():
                target.unlink()
            shutil.copyfile(p, target)
            os.chmod(target, p.stat().st_mode & 0o777)


def overlay_lowerdirs() -> set[str]:
    """Lower directories of mounted overlays (images still in use by running VMs)."""
    used: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if " - overlay " not in line:
                continue
            opts = line.rsplit(" ", 1)[-1]
            for o in opts.split(","):
                if o.startswith("lowerdir="):
                    used.update(o.removeprefix("lowerdir=").split(":"))
    return used


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        log("lock.wait", path=path)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Builder:
    def __init__(self, out: Path, *, force: bool, keep: int) -> None:
        self.out = out.resolve()
        self.cache = self.out / "cache"
        self.force = force
        self.keep = keep
        self.t0 = time.monotonic()
        self.steps_done = 0

    def step(self, name: str, n: int, total: int) -> None:
        log("step", n=f"{n}/{total}", name=name, elapsed=f"{time.monotonic() - self.t0:.1f}s")

    async def build(self) -> Path:
        if os.geteuid() != 0:
            raise BuildError("building the image needs root (mmdebstrap --mode=root, nspawn)")
        bhash = base_hash()
        sources = source_files()
        ihash = image_hash(bhash, sources)
        image_id = ihash[:12]
        target = self.out / image_id
        current = self.out / "current"
        if not self.force and (target / "manifest.json").exists():
            self._point_current(current, image_id)
            log("up-to-date", image=image_id, path=target)
            return target
        self.cache.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(".*.tmp"):  # an interrupted build (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale)
        total = 6
        base_tar = self.cache / f"base-{bhash[:16]}.tar"
        self.step("base", 1, total)
        if self.force or not base_tar.exists():
            await self._build_base(base_tar)
        else:
            log("base.cached", tar=base_tar)
        work = self.out / f".{image_id}.tmp"
        if work.exists():
            shutil.rmtree(work)
        rootfs = work / "rootfs"
        rootfs.mkdir(parents=True)
        self.step("unpack", 2, total)
        await run(
            ["tar", "-C", str(rootfs), "--xattrs", "--numeric-owner", "-xpf", str(base_tar)],
            timeout=600,
        )
        self.step("wheel", 3, total)
        wheel = await self._build_wheel(sources, work / "wheel")
        self.step("venv+configure", 4, total)
        await self._configure(rootfs, wheel, image_id)
        self.step("disk", 5, total)
        kernel = await self._disk(rootfs, work)
        self.step("finish", 6, total)
        disk = work / "disk.img"
        st = disk.stat()
        manifest = Manifest(
            image_id=image_id,
            version=release_text(project_version(), image_id).strip(),
            base_hash=bhash,
            image_hash=ihash,
            suite=SUITE,
            kernel=kernel,
            build_seconds=round(time.monotonic() - self.t0, 1),
            rootfs_bytes=du_bytes(rootfs),
            disk_bytes=st.st_size,
            disk_allocated_bytes=st.st_blocks * 512,
        )
        (work / "manifest.json").write_text(json.dumps(manifest.__dict__, indent=2) + "\n")
        shutil.rmtree(work / "wheel", ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
        self._point_current(current, image_id)
        self._gc(image_id)
        log(
            "done",
            image=image_id,
            seconds=manifest.build_seconds,
            rootfs_mb=manifest.rootfs_bytes >> 20,
            disk_mb=manifest.disk_allocated_bytes >> 20,
        )
        return target

    async def _build_base(self, base_tar: Path) -> None:
        packages = parse_packages((HERE / "packages.txt").read_text())
        staging = self.cache / "base-staging"
        staging.mkdir(exist_ok=True)
        shutil.copyfile(HERE / "initramfs-modules", staging / "modules")
        (staging / "sysvm.conf").write_text("MODULES=list\nCOMPRESS=zstd\n")
        tmp = base_tar.with_suffix(".tar.tmp")
        tmp.unlink(missing_ok=True)
        argv = mmdebstrap_argv(packages, tmp, staging)
        log("mmdebstrap", suite=SUITE, packages=len(packages))
        await run(argv, timeout=1800, echo=True)
        tmp.rename(base_tar)
        for old in self.cache.glob("base-*.tar"):
            if old != base_tar:
                old.unlink()

    async def _build_wheel(self, sources: Sequence[tuple[str, bytes]], out: Path) -> str:
        """Builds the project wheel from a clean copy of exactly the hashed sources."""
        src = out / "src"
        for name, data in sources:
            rel = name.rsplit(":", 1)[0] if name.rsplit(":", 1)[-1].isdigit() else name
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        (src / "README.md").write_text("sysvm\n")
        await run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-w",
                str(out),
                str(src),
            ],
            timeout=600,
        )
        wheels = sorted(out.glob("sysvm-*.whl"))  # noqa: ASYNC240
        if len(wheels) != 1:
            raise BuildError(f"expected one wheel in {out}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as z:
            missing = missing_from_wheel(sources, z.namelist())
        if missing:
            # pyproject.toml's package-data decides what ships; say what it leaves out
            log("wheel.missing-files", count=len(missing), files=",".join(missing[:10]))
        return wheels[0].name

    async def _configure(self, rootfs: Path, wheel: str, image_id: str) -> None:
        copy_tree(HERE / "files", rootfs)
        install_novnc(rootfs)
        unit_dst = rootfs / "etc/systemd/system/sysvm-agent.service"
        if AGENT_UNIT.exists():
            shutil.copyfile(AGENT_UNIT, unit_dst)
        else:
            log("agent-unit.missing", path=AGENT_UNIT, using="systemvm_image/fallback")
            shutil.copyfile(HERE / "sysvm-agent.fallback.service", unit_dst)
        os.chmod(unit_dst, 0o644)
        (rootfs / "etc/sysvm-release").write_text(release_text(project_version(), image_id))
        staging = rootfs / "var/tmp/sysvm-build"
        staging.mkdir(parents=True)
        shutil.copyfile(REPO / "constraints.txt", staging / "constraints.txt")
        shutil.copyfile(self.out / f".{image_id}.tmp" / "wheel" / wheel, staging / wheel)
        pipcache = self.cache / "pip"
        pipcache.mkdir(exist_ok=True)
        # The build host's trust store (it may sit behind a TLS-inspecting proxy) is lent to
        # pip read-only for the build; it never lands in the image.
        host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
        ca_args = (
            [
                f"--bind-ro={host_ca}:/run/sysvm-build-ca.crt",
                "--setenv=PIP_CERT=/run/sysvm-build-ca.crt",
            ]
            if host_ca.is_file()  # noqa: ASYNC240
            else []
        )
        # one nspawn call per step: argv lists, no shell inside the image either
        for argv in in_root_steps(wheel):
            await run(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--keep-unit",
                    "--register=no",
                    "--resolv-conf=replace-host",
                    "--timezone=off",
                    "-D",
                    str(rootfs),
                    f"--bind={pipcache}:/var/cache/sysvm-pip",
                    "--setenv=PIP_CACHE_DIR=/var/cache/sysvm-pip",
                    *ca_args,
                    "--",
                    *argv,
                ],
                timeout=900,
                echo=argv[0].endswith("pip"),
            )
        shutil.rmtree(staging)
        # every VM makes its own identity at first boot
        (rootfs / "etc/machine-id").write_text("")
        with contextlib.suppress(FileNotFoundError):
            (rootfs / "var/lib/dbus/machine-id").unlink()
        for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
        (rootfs / "etc/resolv.conf").write_text("")
        (rootfs / "etc/hostname").write_text("sysvm\n")
        for d in ("var/log/journal", "var/cache/apt/archives"):
            shutil.rmtree(rootfs / d, ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)

    async def _disk(self, rootfs: Path, work: Path) -> str:
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise BuildError("no kernel in the image (linux-image-amd64 missing?)")
        kver = kernels[-1].name.removeprefix("vmlinuz-")
        initrd = rootfs / "boot" / f"initrd.img-{kver}"
        if not initrd.exists():
            raise BuildError(f"no initrd for kernel {kver}")
        shutil.copyfile(kernels[-1], work / "vmlinuz")
        shutil.copyfile(initrd, work / "initrd.img")
        size_mb = du_bytes(rootfs) * 13 // 10 // (1 << 20) + 384
        disk = work / "disk.img"
        with disk.open("wb") as f:
            f.truncate(size_mb << 20)
        await run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "sysvm-root",
                "-E",
                "root_owner=0:0",
                "-d",
                str(rootfs),
                str(disk),
            ],
            timeout=900,
        )
        return kver

    def _point_current(self, current: Path, image_id: str) -> None:
        tmp = self.out / ".current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(image_id)
        tmp.rename(current)

    def _gc(self, keep_id: str) -> None:
        """Removes older images beyond --keep, unless a running VM's overlay uses them."""
        in_use = overlay_lowerdirs()
        images = sorted(
            (p for p in self.out.iterdir() if p.is_dir() and (p / "manifest.json").exists()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in images[self.keep :]:
            if old.name == keep_id or str(old / "rootfs") in in_use:
                continue
            log("gc", image=old.name)
            shutil.rmtree(old, ignore_errors=True)


def default_out() -> Path:
    return Path(os.environ.get("SYSVM_IMAGE_DIR", REPO / "build" / "image"))


async def build_image(out: Path | None = None, *, force: bool = False, keep: int = 2) -> Path:
    """Builds (or reuses) the image; returns its directory (``<out>/<image id>``)."""
    out = (out or default_out()).resolve()
    b = Builder(out, force=force, keep=keep)
    with locked(out / ".lock"):
        return await b.build()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build-image", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=default_out(), help="output directory")
    ap.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    ap.add_argument("--keep", type=int, default=2, help="how many images to keep")
    ap.add_argument("--print-hash", action="store_true", help="print the image id and exit")
    args = ap.parse_args(argv)
    if args.print_hash:
        print(image_hash(base_hash(), source_files())[:12])
        return 0
    try:
        path = asyncio.run(build_image(args.out, force=args.force, keep=args.keep))
    except BuildError as e:
        log("failed", error=str(e).splitlines()[0])
        print(str(e), file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
