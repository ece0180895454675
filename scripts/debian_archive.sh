#!/bin/bash
# A local Debian archive for tests: the .debs a minimal base needs (mmdebstrap's essential
# set + apt + python3, whose standard library the guest agent needs: json and ctypes,
# which python3-minimal lacks), busybox-static (the OCI tests build a small image
# from it), musl (with it, a musl-based image: the self-contained guest agent's
# tests) and python3-numpy + python3-pandas (the data-science template's test makes its
# image offline from them), and what the E2B-compatible `base` template holds
# (corral.templates.base: git, curl, ca-certificates, procps, passwd for useradd;
# bash, coreutils and ncurses-bin's tput are essential), downloaded once from this host's own apt sources and
# indexed as a flat file:// repository. Tests bootstrap root filesystems from it offline
# (the network rule: no test reaches the real archive).
#
#   scripts/debian_archive.sh DIR    -> DIR/pool/*.deb, DIR/Packages(.gz), DIR/Release
#
# Usage from a test:  mmdebstrap --variant=apt --include=python3-minimal bookworm OUT \
#                       "deb [trusted=yes] file://DIR ./"
# Run as root (mmdebstrap's root mode resolves the package set by installing it into a
# throw-away chroot whose apt cache we keep). Idempotent: does nothing when DIR/Release
# exists and DIR/packages records the same package list; a changed list rebuilds it;
# delete DIR to refresh.
set -euo pipefail

dir=$(realpath -m "${1:?usage: $0 DIR}")
packages="apt,python3-minimal,python3,busybox-static,musl,nodejs,ruby,golang-go,python3-numpy,python3-pandas,git,curl,ca-certificates,procps,passwd"
if [ -f "$dir/Release" ] && [ "$(cat "$dir/packages" 2>/dev/null)" = "$packages" ]; then
  exit 0
fi
for tool in mmdebstrap dpkg-scanpackages apt-ftparchive; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run make setup as root" >&2; exit 1; }
done
if [ "$(id -u)" != 0 ]; then
  echo "the local Debian archive is made once as root: sudo make setup" >&2
  exit 1
fi
. /etc/os-release
suite=${VERSION_CODENAME:?this host names no Debian suite in /etc/os-release}
# The host's own apt sources (deb822 or one-line), so a mirror or proxy the host uses applies.
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list

rm -rf "$dir.partial"
mkdir -p "$dir.partial/pool"
echo "downloading the .debs of a minimal $suite base ($packages) into $dir"
# download/empty and essential/unlink keep every .deb in the chroot's apt cache; the
# customize hook copies that cache out before the chroot goes away (/dev/null: no image).
mmdebstrap --quiet --mode=root --variant=apt --include="$packages" \
  --skip=download/empty --skip=essential/unlink \
  --customize-hook="sync-out /var/cache/apt/archives $dir.partial/pool" \
  "$suite" /dev/null "$sources" </dev/null
rm -rf "$dir.partial/pool/partial" "$dir.partial/pool/lock"
echo "$packages" > "$dir.partial/packages"
(
  cd "$dir.partial"
  dpkg-scanpackages --multiversion pool /dev/null 2>/dev/null > Packages
  gzip -9nk Packages
  apt-ftparchive -o APT::FTPArchive::Release::Suite="$suite" \
    -o APT::FTPArchive::Release::Codename="$suite" release . > Release
)
rm -rf "$dir"
mv "$dir.partial" "$dir"
echo "local Debian archive: $(ls "$dir/pool" | wc -l) packages, $(du -sh "$dir" | cut -f1) in $dir"
