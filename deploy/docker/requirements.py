"""Print the server's dependencies from pyproject.toml, one per line, leaving out the named ones.

The fairchem image uses it: fairchem-core needs e3nn >= 0.5, which mace-torch (e3nn 0.4.4) and
sevenn cannot share, so that image installs every other dependency of mlipserve from this list, then
mlipserve itself with --no-deps. Reading pyproject.toml keeps the image's pins those of the project.

    python deploy/docker/requirements.py pyproject.toml --exclude mace-torch sevenn e3nn
"""

from __future__ import annotations

import argparse
import re
import tomllib


def _name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: str, exclude: list[str]) -> list[str]:
    with open(pyproject, "rb") as fh:
        dependencies = tomllib.load(fh)["project"]["dependencies"]
    dropped = {_name(e) for e in exclude}
    unknown = dropped - {_name(d) for d in dependencies}
    if unknown:
        raise SystemExit(f"--exclude names no dependency of the project: {', '.join(sorted(unknown))}")
    return [d for d in dependencies if _name(d) not in dropped]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="NAME")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.exclude)))


if __name__ == "__main__":
    main()
