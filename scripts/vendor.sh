#!/usr/bin/env bash
# Fetch the pinned MLX wheel and the mlx-c sources into vendor/, checking each
# download's sha256. Does nothing for a piece that is already unpacked.
# Usage: scripts/vendor.sh   (MLX_BACKEND=cuda or cuda13 selects the CUDA 13 wheel on
# Linux, cuda12 the CUDA 12 one)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$root/vendor"
# shellcheck source=../vendor/pins.env
source "$vendor/pins.env"

die() { echo "vendor: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed: $2"; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# Which wheel this platform links against. mlx-c always compiles against the
# CPU wheel's MLX headers (the same MLX version), so a CUDA backend vendors both.
os="$(uname -s)"
backend="${MLX_BACKEND:-}"
case "$os/$backend" in
    Linux/ | Linux/cpu) keys=(LINUX_CPU) ;;
    Linux/cuda | Linux/cuda13) keys=(LINUX_CPU LINUX_CUDA13); runtime=13 ;;
    Linux/cuda12) keys=(LINUX_CPU LINUX_CUDA12); runtime=12 ;;
    Darwin/ | Darwin/metal) keys=(MACOS) ;;
    *) die "no pinned MLX wheel for OS '$os' with MLX_BACKEND='$backend' (Linux: cpu, cuda (= cuda13) or cuda12; macOS: metal)" ;;
esac

downloads="$vendor/downloads"
mkdir -p "$downloads" "$vendor/mlx"

# --- the MLX wheels ----------------------------------------------------------
vendor_wheel() {
    local key="$1"
    local name_var="MLX_${key}_WHEEL" file_var="MLX_${key}_FILE" sha_var="MLX_${key}_SHA256" plat_var="MLX_${key}_PLATFORM"
    local wheel_name="${!name_var}" wheel_file="${!file_var}" wheel_sha="${!sha_var}" wheel_plat="${!plat_var}"
    wheel_dir="$vendor/mlx/$wheel_name-$MLX_VERSION"
    if [ -f "$wheel_dir/.complete" ] && [ "$(cat "$wheel_dir/.complete")" = "$wheel_sha" ]; then
        echo "vendor: $wheel_name $MLX_VERSION already unpacked in ${wheel_dir#"$root"/}"
        return
    fi
    need python3 "install Python 3 with pip (Debian: apt-get install python3-pip)"
    python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip: install it (Debian: apt-get install python3-pip)"
    if [ ! -f "$downloads/$wheel_file" ] || [ "$(sha256_of "$downloads/$wheel_file")" != "$wheel_sha" ]; then
        rm -f "$downloads/$wheel_file"
        echo "vendor: downloading $wheel_name==$MLX_VERSION ($wheel_plat)"
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --platform "$wheel_plat" --python-version 3.11 \
            -d "$downloads" "$wheel_name==$MLX_VERSION" \
            || die "pip could not download $wheel_name==$MLX_VERSION: check access to PyPI"
    fi
    [ -f "$downloads/$wheel_file" ] || die "pip did not produce $wheel_file (the pin in vendor/pins.env may be stale)"
    local got
    got="$(sha256_of "$downloads/$wheel_file")"
    if [ "$got" != "$wheel_sha" ]; then
        die "sha256 mismatch for $wheel_file: expected $wheel_sha, got $got. Delete vendor/downloads/$wheel_file and run 'make vendor' again; if it persists, the registry serves a different file than the pin: do not update the pin without checking why."
    fi
    rm -rf "$wheel_dir.tmp" "$wheel_dir"
    python3 -m zipfile -e "$downloads/$wheel_file" "$wheel_dir.tmp"
    [ -f "$wheel_dir.tmp/mlx/lib/libmlx.so" ] || [ -f "$wheel_dir.tmp/mlx/lib/libmlx.dylib" ] \
        || die "$wheel_file has no mlx/lib/libmlx: not the library wheel"
    case "$key" in LINUX_CPU | MACOS)
        [ -d "$wheel_dir.tmp/mlx/include" ] || die "$wheel_file has no mlx/include: not the library wheel" ;;
    esac
    echo "$wheel_sha" > "$wheel_dir.tmp/.complete"
    mv "$wheel_dir.tmp" "$wheel_dir"
    echo "vendor: unpacked $wheel_name $MLX_VERSION into ${wheel_dir#"$root"/}"
}
for key in "${keys[@]}"; do vendor_wheel "$key"; done

# --- the NVIDIA runtime libraries a CUDA libmlx.so loads --------------------
# libmlx.so's RPATH looks in $ORIGIN/../../nvidia/*/lib, that is in the wheel's
# folder here: the pinned runtime wheels go there unless the system's loader
# already finds every library (a CUDA toolkit install, a distribution package).
if [ -n "${runtime:-}" ]; then
    need readelf "install binutils (Debian: apt-get install binutils)"
    ldconfig_bin=$(command -v ldconfig || echo /sbin/ldconfig)
    known=$("$ldconfig_bin" -p 2>/dev/null || true)
    needed=$(readelf -d "$wheel_dir/mlx/lib/libmlx.so" | sed -n 's/.*NEEDED.*\[\(lib\(cu\|nccl\|nvrtc\)[^]]*\)\].*/\1/p')
    [ -n "$needed" ] || die "readelf lists no CUDA libraries in $wheel_dir/mlx/lib/libmlx.so: not the CUDA wheel?"
    missing=()
    for lib in $needed; do
        [ "$lib" = libcuda.so.1 ] && continue   # the driver's own library
        case "$known" in *"$lib "*) ;; *) missing+=("$lib") ;; esac
    done
    req="$vendor/cuda$runtime-runtime.txt"
    stamp="$wheel_dir/nvidia/.complete"
    if [ ${#missing[@]} -eq 0 ]; then
        echo "vendor: the system's loader finds the CUDA $runtime runtime libraries libmlx.so needs"
    elif [ -f "$stamp" ] && [ "$(sha256_of "$req")" = "$(cat "$stamp")" ]; then
        echo "vendor: CUDA $runtime runtime wheels already in ${wheel_dir#"$root"/}/nvidia"
    else
        echo "vendor: installing the pinned CUDA $runtime runtime wheels (${missing[*]} not found by the loader; about 1.5 GB)"
        python3 -m pip install --quiet --no-deps --require-hashes --only-binary=:all: \
            --platform manylinux_2_35_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64 \
            --python-version 3.11 --upgrade --target "$wheel_dir" -r "$req" \
            || die "pip could not install the CUDA $runtime runtime wheels of $req"
        sha256_of "$req" > "$stamp"
    fi
    command -v nvidia-smi >/dev/null 2>&1 \
        || echo "vendor: note: no nvidia-smi here; the CUDA build links, but runs only where an NVIDIA driver is installed"
fi

# --- the mlx-c sources -------------------------------------------------------
mlxc_dir="$vendor/mlx-c"
if [ -f "$mlxc_dir/.complete" ] && [ "$(cat "$mlxc_dir/.complete")" = "$MLXC_CRATE_SHA256" ]; then
    echo "vendor: mlx-c from $MLXC_CRATE $MLXC_CRATE_VERSION already unpacked in vendor/mlx-c"
else
    need cargo "install Rust with rustup (https://rustup.rs)"
    need python3 "install Python 3"
    fetch="$downloads/mlxc-fetch"
    rm -rf "$fetch"
    mkdir -p "$fetch"
    cat > "$fetch/Cargo.toml" <<EOF
[package]
name = "kvserve-fetch-mlx-c"
version = "0.0.0"
edition = "2021"
publish = false
[lib]
path = "lib.rs"
[dependencies]
$MLXC_CRATE = { version = "=$MLXC_CRATE_VERSION", default-features = false }
[workspace]
EOF
    : > "$fetch/lib.rs"
    echo "vendor: fetching crate $MLXC_CRATE $MLXC_CRATE_VERSION for the mlx-c sources"
    (cd "$fetch" && cargo vendor --quiet --versioned-dirs crates >/dev/null) \
        || die "cargo could not fetch $MLXC_CRATE $MLXC_CRATE_VERSION: check access to crates.io"
    crate="$fetch/crates/$MLXC_CRATE-$MLXC_CRATE_VERSION"
    # cargo records the sha256 of the .crate it downloaded (and checked against the index).
    got="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["package"])' "$crate/.cargo-checksum.json")"
    if [ "$got" != "$MLXC_CRATE_SHA256" ]; then
        die "sha256 mismatch for $MLXC_CRATE-$MLXC_CRATE_VERSION.crate: expected $MLXC_CRATE_SHA256, got $got. Do not update the pin without checking why."
    fi
    [ -d "$crate/src/mlx-c/mlx/c" ] || die "$MLXC_CRATE $MLXC_CRATE_VERSION does not contain src/mlx-c"
    rm -rf "$mlxc_dir.tmp" "$mlxc_dir"
    cp -R "$crate/src/mlx-c" "$mlxc_dir.tmp"
    echo "$MLXC_CRATE_SHA256" > "$mlxc_dir.tmp/.complete"
    mv "$mlxc_dir.tmp" "$mlxc_dir"
    rm -rf "$fetch"
    echo "vendor: unpacked mlx-c into vendor/mlx-c"
fi
