"""python -m data list | fetch NAME... | verify"""

import argparse
import sys

from data.download import DataError, cache_dir, fetch, file_lock, is_cached, log
from data.registry import DATASETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data",
        description="Download, verify and cache the datasets the chapters use. "
        "Cache: $HCL_DATA_DIR (default ~/.cache/hand-craft-llm). Mirror: $HCL_DATA_MIRROR "
        "(a folder or http(s) URL laid out like shared/data), tried before the origins.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the datasets, their sizes and whether they are cached")
    fetch_parser = commands.add_parser("fetch", help="fetch and verify datasets into the cache")
    fetch_parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(DATASETS)}")
    commands.add_parser("verify", help="re-hash every cached file; delete and report the bad ones")
    arguments = parser.parse_args(argv)

    try:
        if arguments.command == "list":
            print(f"cache: {cache_dir()}")
            for name, files in DATASETS.items():
                megabytes = sum(data_file.size for data_file in files) / 1e6
                cached = sum(is_cached(data_file) for data_file in files)
                print(f"{name:12s} {len(files):3d} files {megabytes:8.1f} MB   cached {cached}/{len(files)}")
        elif arguments.command == "fetch":
            for name in arguments.names:
                print(f"{name}: {fetch(name)}")
        else:
            bad = 0
            for files in DATASETS.values():
                for data_file in files:
                    path = cache_dir() / data_file.name
                    if not path.exists():
                        continue
                    with file_lock(path):  # never while another process is fetching this very file
                        if not path.exists():
                            continue
                        if is_cached(data_file):
                            print(f"ok   {data_file.name}")
                        else:
                            bad += 1
                            path.unlink()
                            log(f"BAD  {data_file.name}: sha256 mismatch, deleted (fetch it again)")
            return 1 if bad else 0
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
