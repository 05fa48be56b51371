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
    # Paths inside the package (its tarball's package/ directory), kept as they are under
    # the package's directory: lib/xterm.js is served as /static/vendor/xterm/lib/xterm.js.
    files: tuple[str, ...]


# The table: Swagger UI for /docs; the terminal, htmx and the graphs for the dashboard (/ui).
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
    Package(
        name="@xterm/xterm",
        version="5.5.0",
        integrity="sha512-hqJHYaQb5OptNunnyAnkHyM8aCjZ1MEIDTQu1iIbbTD/xops91NB5yq1ZK/dC2JDbVWtF23z"
        "Utl9JE2NqwT87A==",
        licence="MIT",
        directory="xterm",
        files=("lib/xterm.js", "css/xterm.css", "LICENSE"),
    ),
    Package(
        name="@xterm/addon-fit",
        version="0.10.0",  # the add-on release made for xterm 5.5
        integrity="sha512-UFYkDm4HUahf2lnEyHvio51TNGiLK66mqP2JoATy7hRZeXaGMRDr00JiSF7m63vR5WKATF605y"
        "EggJKsw0JpMQ==",
        licence="MIT",
        directory="xterm-addon-fit",
        files=("lib/addon-fit.js", "LICENSE"),
    ),
    Package(
        name="htmx.org",
        version="2.0.4",
        integrity="sha512-HLxMCdfXDOJirs3vBZl/ZLoY+c7PfM4Ahr2Ad4YXh6d22T5ltbTXFFkpx9Tgb2vvmWFMbIc3"
        "LqN2ToNkZJvyYQ==",
        licence="0BSD",
        directory="htmx",
        files=("dist/htmx.min.js", "LICENSE"),
    ),
    Package(
        name="uplot",
        version="1.6.32",
        integrity="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/"
        "ep3tOkyTxpiQIw==",
        licence="MIT",
        directory="uplot",
        files=("dist/uPlot.iife.min.js", "dist/uPlot.min.css", "LICENSE"),
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
                (target / name).parent.mkdir(parents=True, exist_ok=True)
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
