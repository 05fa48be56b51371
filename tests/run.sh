#!/usr/bin/env bash
# Installs everything the test suite needs on a Debian host (system packages, then this
# package with its test extras) and runs the suite. As root: the tests make real namespaces,
# mounts, cgroups and links. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use beside Python's: libseccomp, for every sandbox's filter; gcc and
# a static libc, to build the native PID 1 (daemon/sandbox/native/); chromium and its driver,
# for the dashboard's tests in a real browser (tests/browser/); a static busybox, a registry
# and skopeo, for the image tests (tests/integration/test_images.py); tmux, for the client's
# interactive terminal tests (tests/cli/).
packages=(libseccomp2 gcc libc6-dev chromium chromium-driver busybox-static docker-registry skopeo tmux)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
    missing+=("$package")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

python3 -m pip install -q -e '.[test]'
exec python3 -m pytest "$@"
