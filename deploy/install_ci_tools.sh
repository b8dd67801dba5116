#!/usr/bin/env bash
# Debian packages that the deployment tests need and pip cannot provide (`make test` runs
# this script):
#   docker-compose (1.29)   tests/deploy/test_deploy_compose.py, and the stack of the smoke test
#   docker.io               the engine (dockerd 20.10) that deploy/ci_container_stack.sh
#                           starts privately for tests/deploy/test_deploy_container.py
#   debootstrap             builds that test's Debian base image: no registry is reachable
#   debian-archive-keyring  what debootstrap checks the archive with (usually there)
#   prometheus              promtool, for tests/deploy/test_deploy_alerts.py
# Safe to run again: installs only what is missing, and refreshes the package lists only
# when it has to install. The smoke test starts a daemon of its own; no Docker service
# needs to run.
set -euo pipefail

packages=(docker-compose docker.io debootstrap debian-archive-keyring prometheus)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null || ! sudo -n true 2>/dev/null; then
        # A machine where packages cannot be installed still runs every other test; the
        # deployment tests that need these tools skip, saying what is missing.
        echo "install_ci_tools: not root and no sudo; not installing: ${missing[*]}" >&2
        exit 0
    fi
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
# Without recommends: docker.io's (git, apparmor, needrestart...) and debootstrap's
# (gnupg, arch-test) are not needed to build and run the images here.
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
