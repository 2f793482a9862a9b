#!/usr/bin/env bash
# Installs what building and testing kiln needs on a Debian 12 machine:
# host packages (apt) and Rust targets (rustup). Safe to run again.
set -euo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

packages=(
  # kernel builds
  build-essential bc flex bison libelf-dev libssl-dev
  # inputs and artifacts
  ca-certificates xz-utils zstd cpio file
  # booting images
  qemu-system-x86 qemu-utils
  # the DHCP client's tests run dnsmasq in network namespaces
  dnsmasq-base iproute2
  # external checkers for the formats kiln writes
  squashfs-tools cryptsetup-bin gdisk fdisk dosfstools mtools e2fsprogs bmap-tools openssl
  # UEFI boot: firmware and systemd-boot/stub
  ovmf seabios ipxe-qemu systemd-boot-efi sbsigntool binutils xorriso
  # signatures
  minisign
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# apt-get download (for `deb` inputs) needs package lists even when nothing
# is missing, so update once per machine.
if [ ${#missing[@]} -gt 0 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
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

targets=(x86_64-unknown-linux-musl)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
