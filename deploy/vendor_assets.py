#!/usr/bin/env python3
"""Vendor the browser assets the daemon serves, from npm, at the exact versions pinned below.

Run from the repository: `python3 deploy/vendor_assets.py` (needs `npm`; only the npm registry
is contacted). For each package of PACKAGES it runs `npm pack NAME@VERSION`, checks the
tarball's sha512 against the pinned integrity, copies the listed files into
api/static/vendor/<directory>/ (replacing what was there) and writes a VERSIONS file there naming
the package, its version, its integrity and its licence. Commit the result: the daemon serves
these files and never fetches anything at run time (`/docs` works with no internet).

To add or bump a package: add or edit its row, with the integrity that `npm view
NAME@VERSION dist.integrity` prints, run the script, and commit the files it wrote.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENDOR = REPO / "api" / "static" / "vendor"


@dataclass(frozen=True)
class Package:
    name: str  # on npm
    version: str  # exact: never a range
    integrity: str  # the tarball's sha512, as npm's dist.integrity gives it
    licence: str
    directory: str  # under api/static/vendor/
    files: tuple[str, ...]  # paths inside the package (its tarball's package/ directory)


# The table. More are to come (xterm, @xterm/addon-fit, htmx.org, uplot): one row each.
PACKAGES = (
    Package(
        name="swagger-ui-dist",
        version="5.35.0",
        integrity="sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8Cgwrz"
        "U4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ==",
        licence="Apache-2.0",
        directory="swagger-ui",
        files=("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "LICENSE", "NOTICE"),
    ),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="only these packages (default: every one)")
    args = parser.parse_args()
    unknown = set(args.names) - {p.name for p in PACKAGES}
    if unknown:
        parser.error(f"not in the table: {', '.join(sorted(unknown))}")
    for package in PACKAGES:
        if not args.names or package.name in args.names:
            vendor(package)
    return 0


def vendor(package: Package) -> None:
    """Fetch, check, and copy one package's files into its directory."""
    with tempfile.TemporaryDirectory(prefix="vendor-") as scratch:
        tarball = fetch(package, Path(scratch))
        check_integrity(tarball, package)
        target = VENDOR / package.directory
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            for name in package.files:
                member = tar.getmember(f"package/{name}")  # KeyError: not in this version
                source = tar.extractfile(member)
                if source is None:
                    raise SystemExit(f"{package.name}: {name} is not a regular file")
                (target / name).write_bytes(source.read())
        notices = ", ".join(n for n in ("LICENSE", "NOTICE") if n in package.files)
        (target / "VERSIONS").write_text(
            f"{package.name}@{package.version}\n"
            f"licence: {package.licence} (see {notices})\n"
            f"integrity: {package.integrity}\n"
            f"files: {', '.join(package.files)}\n"
            "fetched with `npm pack` by deploy/vendor_assets.py; do not edit by hand\n"
        )
    print(f"vendored {package.name}@{package.version} into {target.relative_to(REPO)}")


def fetch(package: Package, scratch: Path) -> Path:
    spec = f"{package.name}@{package.version}"
    result = subprocess.run(
        ["npm", "pack", spec, "--json", "--pack-destination", str(scratch)],
        capture_output=True,
        text=True,
        check=False,
        cwd=scratch,  # no package.json of ours nearby to confuse npm
    )
    if result.returncode != 0:
        raise SystemExit(f"npm pack {spec} failed:\n{result.stderr}")
    [packed] = json.loads(result.stdout)
    if packed["version"] != package.version:
        raise SystemExit(f"npm pack {spec} gave version {packed['version']}")
    return scratch / packed["filename"]


def check_integrity(tarball: Path, package: Package) -> None:
    """The tarball must be the one pinned: a republished or tampered package stops here."""
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if f"sha512-{digest}" != package.integrity:
        raise SystemExit(
            f"{package.name}@{package.version}: integrity sha512-{digest} is not the pinned "
            f"{package.integrity}"
        )


if __name__ == "__main__":
    sys.exit(main())
