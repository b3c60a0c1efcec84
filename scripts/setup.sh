#!/usr/bin/env bash
# Installs everything vmreplica needs on a fresh Debian 12 machine: Debian packages (QEMU,
# libnbd's Python bindings, tools the tests use) and a venv at .venv with the Python packages.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(qemu-system-x86 qemu-utils qemu-block-extra python3-libnbd python3-venv rsync e2fsprogs iproute2 util-linux systemd chromium
      python3-gssapi krb5-kdc krb5-admin-server krb5-user faketime
      libvirt-daemon-system libvirt-clients python3-libvirt lvm2 etcd-server etcd-client)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's python3-libnbd imports only into Debian's /usr/bin/python3, so the venv is made
# from it and sees the system site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import nbd" 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,bench]'
  touch "$stamp"
fi
