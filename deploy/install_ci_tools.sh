#!/usr/bin/env bash
# Debian packages that the deployment tests need and pip cannot provide:
# docker-compose (1.29) for tests/test_deploy_compose.py. Safe to run again: installs only
# what is missing, and refreshes the package lists only when it has to install.
set -euo pipefail

packages=(docker-compose)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
# Without recommends: docker-compose would otherwise pull in the whole Docker engine.
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
