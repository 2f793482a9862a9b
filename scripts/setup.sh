#!/usr/bin/env bash
# Installs what building and testing kiln needs on a Debian 12 machine:
# host packages (apt) and Rust targets (rustup). Safe to run again.
#
# `./scripts/setup.sh fuzz` also installs what fuzzing kiln-init's parsers
# needs (init/fuzz/README.md): a nightly toolchain and cargo-fuzz. The
# README's commands never ask for it; CI replays the fuzz corpora on stable.
set -euo pipefail

fuzz=""
case "${1:-}" in
  "") ;;
  fuzz) fuzz=1 ;;
  *) echo "usage: $0 [fuzz]" >&2; exit 2 ;;
esac

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

packages=(
  # kernel builds
  build-essential bc flex bison libelf-dev libssl-dev patch
  # inputs and artifacts
  ca-certificates xz-utils zstd cpio file
  # kiln serve's TLS is checked with curl and openssl
  curl
  # arm64 and armv7: cross compilers (kernels; armv7 also links kiln-init
  # against static glibc with it), QEMU, UEFI firmware for arm64
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-system-arm qemu-efi-aarch64
  # booting images
  qemu-system-x86 qemu-utils
  # the DHCP client's tests run dnsmasq in network namespaces
  dnsmasq-base iproute2
  # external checkers for the formats kiln writes
  squashfs-tools cryptsetup-bin gdisk fdisk dosfstools mtools e2fsprogs bmap-tools openssl tar
  # u-boot script images (boot.scr): mkimage checks the ones kiln writes
  u-boot-tools
  # device trees on board cards: fdtget reads their model and compatible
  device-tree-compiler
  # UEFI boot: firmware and systemd-boot/stub
  ovmf seabios ipxe-qemu systemd-boot-efi sbsigntool binutils xorriso
  # Secure Boot signing: sbsign's signing time pinned by faketime; openssl
  # checks that the db key matches its certificate
  faketime openssl
  # signatures
  minisign
)

# `deb` inputs for arm64 and armv7 images (busybox, systemd-boot, u-boot)
# come from the arm64 and armhf archives: apt-get download needs the foreign
# arch in its lists.
foreign_added=""
for a in arm64 armhf; do
  if ! dpkg --print-foreign-architectures | grep -qx "$a"; then
    $sudo dpkg --add-architecture "$a"
    foreign_added=1
  fi
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# apt-get download (for `deb` inputs) needs package lists even when nothing
# is missing, so update once per machine.
if [ ${#missing[@]} -gt 0 ] || [ -n "$foreign_added" ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  $sudo apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # Some images carry qemu-utils from backports, which conflicts with the
  # release's qemu-system; take both from the release.
  . /etc/os-release
  extra=()
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    extra=("qemu-utils/${VERSION_CODENAME}" "qemu-block-extra/${VERSION_CODENAME}")
  fi
  $sudo apt-get install -y -qq --allow-downgrades --no-install-recommends "${missing[@]}" "${extra[@]}" >/dev/null
fi

# The SBOM's external checker: pyspdxtools, from spdx-tools on PyPI.
spdx_tools_version=0.8.5
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('spdx-tools') != '$spdx_tools_version')" 2>/dev/null; then
  echo "setup: installing spdx-tools $spdx_tools_version (pyspdxtools)"
  python3 -m pip --version >/dev/null 2>&1 || $sudo apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  # Debian's own python3 refuses a system-wide pip install (PEP 668)
  # unless told; a pyenv or venv python3 takes it as it is.
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "spdx-tools==$spdx_tools_version" 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "spdx-tools==$spdx_tools_version"
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi
command -v pyspdxtools >/dev/null || { echo "setup: pyspdxtools is not on PATH after installing spdx-tools"; exit 1; }

targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

if [ -n "$fuzz" ]; then
  rustup toolchain list | grep -q '^nightly-' || rustup toolchain install nightly --profile minimal
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
fi
