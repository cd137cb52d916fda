#!/usr/bin/env bash
# Prepares the build dependencies a GPU machine lacks, so they can travel with the repository.
#
# Run HERE (a Debian/Ubuntu x86-64 machine with apt); the GPU machine can reach no registry.
# Downloads the .debs of Check (+ libsubunit) for the tests, cJSON, and pkgconf, and unpacks them
# with dpkg -x (nothing is installed) into .gpu-deps/root, which git ignores. Then carry it:
#   device run, carry [".gpu-deps"], command "bash tools/gpu-check.sh"
# tools/gpu-check.sh finds .gpu-deps/root by itself (or QLORA_CHECK_ROOT / QLORA_CJSON_ROOT).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.gpu-deps
packages=(check libsubunit0 libsubunit-dev libcjson1 libcjson-dev pkgconf pkgconf-bin libpkgconf3)
# The GPU machines are x86-64: ask apt for amd64 packages whatever this machine is.
apt_arch=(-o APT::Architecture=amd64 -o APT::Architectures=amd64)

rm -rf "$dest"
mkdir -p "$dest/debs" "$dest/root"
download() { (cd "$dest/debs" && apt-get "${apt_arch[@]}" download "${packages[@]}"); }
if ! download; then
    echo "gpu-deps: download failed; refreshing the package lists (apt-get update) and retrying" >&2
    apt-get "${apt_arch[@]}" update -qq
    download
fi

for deb in "$dest"/debs/*.deb; do
    dpkg -x "$deb" "$dest/root"
done

# What must be there for tools/gpu-check.sh (fail here, not on the GPU machine).
multiarch=usr/lib/x86_64-linux-gnu
for f in usr/include/check.h usr/include/cjson/cJSON.h usr/bin/pkgconf \
         "$multiarch/pkgconfig/check.pc" "$multiarch/pkgconfig/libcjson.pc" \
         "$multiarch/libcjson.so.1" "$multiarch/libsubunit.so.0"; do
    if [ ! -e "$dest/root/$f" ]; then
        echo "gpu-deps: $dest/root/$f is missing after unpacking" >&2
        exit 1
    fi
done
if ! ls "$dest/root/$multiarch"/pkgconfig/libsubunit.pc "$dest/root/$multiarch"/libcheck*.a >/dev/null 2>&1; then
    echo "gpu-deps: libsubunit.pc or libcheck*.a is missing after unpacking" >&2
    exit 1
fi

(cd "$dest/debs" && ls -1 -- *.deb) >"$dest/MANIFEST"
echo "gpu-deps: unpacked into $dest/root ($(du -sh "$dest" | cut -f1)):"
sed 's/^/  /' "$dest/MANIFEST"
