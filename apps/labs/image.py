"""Build the sandbox image: one image holding the node runtime and every pattern.

    python -m apps.labs.image [--print-tag] [--offline | --online] [--base IMAGE] [--quiet]

The image is tagged by a content hash of ``sandboxes/`` (runtime, patterns and the image's
own files), ``distlab-sandbox:<12 hex>`` and ``distlab-sandbox:latest``, so it is rebuilt
exactly when they change; when the tag exists already nothing happens. Two ways to get a
Debian base (``sandboxes/image/README.md``):

- **online**: ``FROM debian:bookworm-slim``, pulled from a registry;
- **offline**: no registry answers, so a Debian base is made here once with
  ``debootstrap --variant=minbase bookworm`` and ``docker import`` (``distlab-base:bookworm``)
  and reused from then on.

The default (``auto``) uses the online base when it is present or a pull succeeds, the
offline one otherwise. Images are built through the Docker SDK (the legacy builder: the
newer CLI would need ``DOCKER_BUILDKIT=0``). Nothing here needs Django.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import requests

REPO = Path(__file__).resolve().parents[2]
SANDBOXES_DIR = REPO / "sandboxes"
DOCKERFILE = "sandboxes/image/Dockerfile"  # inside the build context
IMAGE_REPOSITORY = "distlab-sandbox"
ONLINE_BASE = "debian:bookworm-slim"
OFFLINE_BASE = "distlab-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LABEL_IMAGE = "io.distlab.image"
LABEL_CONTENT = "io.distlab.content"
BUILD_TIMEOUT = 1800  # seconds without output before a build is given up

Mode = Literal["auto", "online", "offline"]
Log = Callable[[str], None]

# Files never part of the image (nor of its hash): caches and editor droppings.
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".swp"}


class ImageError(RuntimeError):
    """The image could not be built; the message says why in plain words."""


def _quiet(_line: str) -> None:
    pass


def context_files(root: Path = SANDBOXES_DIR) -> list[Path]:
    """The files that go into the image, sorted, relative to ``root``."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in filenames:
            path = Path(dirpath, filename)
            if path.suffix in _SKIP_SUFFIXES or not path.is_file():
                continue
            files.append(path.relative_to(root))
    return sorted(files)


@dataclass(frozen=True)
class Snapshot:
    """The image's files read once, so the hash and the build context always agree even
    while someone edits ``sandboxes/``."""

    files: tuple[tuple[str, bool, bytes], ...]  # (path, executable, content)

    @classmethod
    def read(cls, root: Path = SANDBOXES_DIR) -> Snapshot:
        return cls(
            tuple(
                (rel.as_posix(), os.access(root / rel, os.X_OK), (root / rel).read_bytes())
                for rel in context_files(root)
            )
        )

    def digest(self) -> str:
        """sha256 over every file's path, executable bit and content."""
        digest = hashlib.sha256()
        for rel, executable, data in self.files:
            digest.update(f"{rel}\0{int(executable)}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    def tar(self) -> io.BytesIO:
        """The build context: the files as ``sandboxes/...``, owned by root, fixed times,
        so the same content always gives the same context."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for rel, executable, data in self.files:
                info = tarfile.TarInfo(f"sandboxes/{rel}")
                info.size = len(data)
                info.mode = 0o755 if executable else 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
        buffer.seek(0)
        return buffer


def content_hash(root: Path = SANDBOXES_DIR) -> str:
    return Snapshot.read(root).digest()


def image_tag(root: Path = SANDBOXES_DIR, repository: str = IMAGE_REPOSITORY) -> str:
    """The tag the image of the current ``sandboxes/`` has: ``distlab-sandbox:<12 hex>``."""
    return f"{repository}:{content_hash(root)[:12]}"


def _api(client: Any) -> docker.APIClient:
    """Accept a ``docker.DockerClient`` or its low-level ``APIClient``."""
    return client.api if isinstance(client, docker.DockerClient) else client


def image_exists(client: Any, ref: str) -> bool:
    try:
        _api(client).inspect_image(ref)
    except docker.errors.NotFound:
        return False
    return True


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, "latest"
    return name, tag


def pull_base(client: Any, ref: str, *, log: Log = _quiet) -> str | None:
    """Pull ``ref``; None when it worked, else why not (no registry answers here)."""
    repository, tag = _split_ref(ref)
    try:
        for event in _api(client).pull(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                return str(event["error"])
            if event.get("status") and not event.get("progressDetail"):
                log(f"{ref}: {event['status']}")
    except (docker.errors.APIError, requests.RequestException) as exc:
        return str(getattr(exc, "explanation", None) or exc)
    return None


def build_offline_base(
    client: Any,
    *,
    ref: str = OFFLINE_BASE,
    suite: str = DEBIAN_SUITE,
    mirror: str = DEBIAN_MIRROR,
    log: Log = _quiet,
) -> str:
    """Make a Debian base image without any registry: ``debootstrap --variant=minbase``
    into a temporary folder, then ``docker import``. Done once: an existing ``ref`` is
    reused. Needs root and Debian's ``debootstrap`` package."""
    if image_exists(client, ref):
        return ref
    if shutil.which("debootstrap") is None:
        raise ImageError(
            "No registry answers and debootstrap is missing: install it "
            "(apt-get install debootstrap) to build the Debian base locally."
        )
    if os.geteuid() != 0:
        raise ImageError("Building the Debian base with debootstrap needs root.")
    repository, tag = _split_ref(ref)
    # /var/tmp, not /tmp: debootstrap needs a filesystem that allows devices and exec.
    with tempfile.TemporaryDirectory(prefix="distlab-base-", dir="/var/tmp") as tmp:
        root = Path(tmp, "rootfs")
        log(f"debootstrap --variant=minbase {suite} ({mirror}): about a minute")
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", suite, str(root), mirror],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise ImageError(f"debootstrap failed (exit {done.returncode}):\n{tail}")
        (root / "etc/apt/sources.list").write_text(
            f"deb {mirror} {suite} main\n"
            f"deb {mirror} {suite}-updates main\n"
            f"deb {mirror.rsplit('/', 1)[0]}/debian-security {suite}-security main\n"
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        log(f"docker import {ref}")
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        assert tar.stdout is not None
        try:
            _api(client).import_image(
                src=tar.stdout,
                repository=repository,
                tag=tag,
                stream_src=True,
                changes=['CMD ["bash"]', f"LABEL {LABEL_IMAGE}=base"],
            )
        finally:
            tar.stdout.close()
            returncode = tar.wait()
        if returncode != 0:
            raise ImageError(f"tar of the debootstrap tree failed (exit {returncode})")
    return ref


def resolve_base(client: Any, *, mode: Mode = "auto", base: str = ONLINE_BASE, log: Log) -> str:
    """The base image to build FROM, made available locally."""
    if mode == "offline":
        return build_offline_base(client, log=log)
    if image_exists(client, base):
        return base
    log(f"pulling {base}")
    error = pull_base(client, base, log=log)
    if error is None:
        return base
    if mode == "online":
        raise ImageError(f"Could not pull the base image {base}: {error}")
    log(f"no registry answers ({error.strip()[:160]}): building a local Debian base")
    return build_offline_base(client, log=log)


def _build(client: Any, *, tag: str, base: str, snapshot: Snapshot, log: Log) -> None:
    stream: Iterator[dict[str, Any]] = _api(client).build(
        fileobj=snapshot.tar(),
        custom_context=True,
        dockerfile=DOCKERFILE,
        tag=tag,
        buildargs={"BASE": base},
        labels={LABEL_IMAGE: "sandbox", LABEL_CONTENT: snapshot.digest()},
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
        timeout=BUILD_TIMEOUT,
    )
    for event in stream:
        if "error" in event:
            detail = event.get("errorDetail", {}).get("message") or event["error"]
            raise ImageError(f"Building {tag} failed: {str(detail).strip()}")
        text = event.get("stream", "")
        for line in text.splitlines():
            if line.strip():
                log(line.rstrip())
    if not image_exists(client, tag):
        raise ImageError(f"Building {tag} ended without an image")


def _prune_old(client: Any, *, keep: set[str], repository: str, log: Log, spare: int = 3) -> None:
    """Untag builds older than the ``spare`` newest (which another process may still be
    about to use). Docker refuses while a container uses one: that is fine too."""
    api = _api(client)
    images = sorted(api.images(name=repository), key=lambda i: i.get("Created", 0), reverse=True)
    for image in images[spare:]:
        for ref in image.get("RepoTags") or []:
            if ref in keep:
                continue
            try:
                api.remove_image(ref)
                log(f"removed old image {ref}")
            except docker.errors.APIError:
                pass


def ensure_image(
    client: Any,
    *,
    mode: Mode = "auto",
    base: str = ONLINE_BASE,
    repository: str = IMAGE_REPOSITORY,
    log: Log = _quiet,
) -> str:
    """The sandbox image's tag, building it first if it does not exist yet."""
    snapshot = Snapshot.read()
    tag = f"{repository}:{snapshot.digest()[:12]}"
    try:
        if image_exists(client, tag):
            return tag
        base_ref = resolve_base(client, mode=mode, base=base, log=log)
        log(f"building {tag} from {base_ref}")
        _build(client, tag=tag, base=base_ref, snapshot=snapshot, log=log)
        _api(client).tag(tag, repository, "latest", force=True)
        _prune_old(client, keep={tag, f"{repository}:latest"}, repository=repository, log=log)
    except docker.errors.APIError as exc:
        raise ImageError(f"Docker refused: {exc.explanation or exc}") from exc
    except requests.RequestException as exc:
        raise ImageError(f"The Docker engine did not answer: {exc}") from exc
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apps.labs.image",
        description="Build the sandbox image if it does not exist; print its tag.",
    )
    parser.add_argument("--print-tag", action="store_true", help="print the tag, build nothing")
    way = parser.add_mutually_exclusive_group()
    way.add_argument(
        "--offline", action="store_true", help="build the Debian base locally (debootstrap)"
    )
    way.add_argument("--online", action="store_true", help="pull the base from a registry")
    parser.add_argument(
        "--base",
        default=os.environ.get("DISTLAB_IMAGE_BASE", ONLINE_BASE),
        help=f"base image of the online path (default {ONLINE_BASE}; env DISTLAB_IMAGE_BASE)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the tag")
    args = parser.parse_args(argv)

    if args.print_tag:
        print(image_tag())
        return 0
    mode: Mode = "offline" if args.offline else "online" if args.online else "auto"

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        client = docker.from_env(timeout=120)
    except docker.errors.DockerException as exc:
        print(f"error: the Docker engine does not answer: {exc}", file=sys.stderr)
        return 1
    try:
        print(ensure_image(client, mode=mode, base=args.base, log=log))
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
