#!/usr/bin/env bash
# Prepares the build dependencies a GPU machine lacks, so they can travel with the repository.
#
# Run HERE (a Debian/Ubuntu x86-64 machine with apt); the GPU machine can reach no registry.
# Downloads the .debs of Check (+ libsubunit) for the tests, cJSON, PCRE2, utf8proc, OpenBLAS (OpenMP
# build) and pkgconf, and unpacks them with dpkg -x (nothing is installed) into .gpu-deps/root, which
# git ignores. dpkg -x runs no update-alternatives, so OpenBLAS stays in its openblas-openmp/ dirs.
# OpenBLAS's runtime dependencies (libgfortran5, libquadmath0) go to a separate directory,
# usr/lib/x86_64-linux-gnu/openblas-runtime, used only where the GPU machine lacks them (a copy
# on LD_LIBRARY_PATH would shadow the system's own, possibly newer, ones). Then carry it:
#   device run, carry [".gpu-deps"], command "bash tools/gpu-check.sh"
# tools/gpu-check.sh finds .gpu-deps/root by itself (or QLORA_CHECK_ROOT / QLORA_CJSON_ROOT).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.gpu-deps
packages=(check libsubunit0 libsubunit-dev libcjson1 libcjson-dev pkgconf pkgconf-bin libpkgconf3
          libopenblas-openmp-dev libopenblas0-openmp libopenblas-dev
          libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3
          libutf8proc-dev libutf8proc2)
runtime_packages=(libgfortran5 libquadmath0)
multiarch=usr/lib/x86_64-linux-gnu
openblas=$multiarch/openblas-openmp
runtime=$multiarch/openblas-runtime
# The GPU machines are x86-64: ask apt for amd64 packages whatever this machine is.
apt_arch=(-o APT::Architecture=amd64 -o APT::Architectures=amd64)

rm -rf "$dest"
mkdir -p "$dest/debs" "$dest/root"
download() { (cd "$dest/debs" && apt-get "${apt_arch[@]}" download "${packages[@]}" "${runtime_packages[@]}"); }
if ! download; then
    echo "gpu-deps: download failed; refreshing the package lists (apt-get update) and retrying" >&2
    apt-get "${apt_arch[@]}" update -qq
    download
fi

for p in "${packages[@]}"; do
    dpkg -x "$dest/debs/${p}"_*.deb "$dest/root"
done
mkdir -p "$dest/staging" "$dest/root/$runtime"
for p in "${runtime_packages[@]}"; do
    dpkg -x "$dest/debs/${p}"_*.deb "$dest/staging"
done
cp -a "$dest/staging/$multiarch"/lib*.so* "$dest/root/$runtime/"
rm -rf "$dest/staging"

# Keep under the device tool's 64 MiB carry limit: the static archive (58 MB) and the separate
# BLAS/LAPACK alternative libraries (libopenblas.so itself holds both) are not needed.
rm -f "$dest/root/$openblas"/lib*.a "$dest/root/$openblas"/libblas.* "$dest/root/$openblas"/liblapack.* \
      "$dest/root/$openblas"/pkgconfig/blas-openblas.pc "$dest/root/$openblas"/pkgconfig/lapack-openblas.pc
rm -rf "$dest/root/usr/share/doc"

# What must be there for tools/gpu-check.sh (fail here, not on the GPU machine).
for f in usr/include/check.h usr/include/cjson/cJSON.h usr/bin/pkgconf \
         "$multiarch/pkgconfig/check.pc" "$multiarch/pkgconfig/libcjson.pc" \
         "$multiarch/libcjson.so.1" "$multiarch/libsubunit.so.0" \
         "$multiarch/pkgconfig/libpcre2-8.pc" "$multiarch/libpcre2-8.so.0" usr/include/pcre2.h \
         "$multiarch/pkgconfig/libutf8proc.pc" "$multiarch/libutf8proc.so.2" usr/include/utf8proc.h \
         "$openblas/pkgconfig/openblas.pc" "$openblas/libopenblas.so" "$openblas/libopenblas.so.0" \
         usr/include/x86_64-linux-gnu/openblas-openmp/cblas.h \
         usr/include/x86_64-linux-gnu/openblas-openmp/openblas_config.h \
         "$runtime/libgfortran.so.5" "$runtime/libquadmath.so.0"; do
    if [ ! -e "$dest/root/$f" ]; then
        echo "gpu-deps: $dest/root/$f is missing after unpacking" >&2
        exit 1
    fi
done
if ! ls "$dest/root/$multiarch"/pkgconfig/libsubunit.pc "$dest/root/$multiarch"/libcheck*.a >/dev/null 2>&1; then
    echo "gpu-deps: libsubunit.pc or libcheck*.a is missing after unpacking" >&2
    exit 1
fi

if ! grep -q '^libdir=/usr/lib/x86_64-linux-gnu/openblas-openmp/\?$' "$dest/root/$openblas/pkgconfig/openblas.pc"; then
    echo "gpu-deps: $openblas/pkgconfig/openblas.pc has an unexpected libdir (gpu-check.sh rewrites /usr...)" >&2
    exit 1
fi

(cd "$dest/debs" && ls -1 -- *.deb) >"$dest/MANIFEST"
# The .debs are unpacked; dropping them keeps the carried size down.
rm -rf "$dest/debs"
echo "gpu-deps: unpacked into $dest/root ($(du -sh "$dest" | cut -f1)):"
sed 's/^/  /' "$dest/MANIFEST"
