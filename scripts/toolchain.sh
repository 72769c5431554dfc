#!/usr/bin/env bash
# Makes the toolchain pinned in rust-toolchain.toml available to rustup, then prints its version.
# Where rustup can download, `rustup toolchain install` does it. Where it cannot (CI and development machines here
# reach crates.io but not static.rust-lang.org), an installed `stable` of exactly the pinned version is registered
# under the pinned name (a link to the same sysroot, which is what rustup would have installed). Any other version
# is an error: the build must not silently use a different compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
host=$(RUSTUP_TOOLCHAIN=stable rustc -vV | sed -n 's/^host: //p')
if ! rustup toolchain list | grep -q "^$pinned-$host"; then
  if ! rustup toolchain install "$pinned" --profile minimal --component rustfmt,clippy >/dev/null 2>&1; then
    have=$(RUSTUP_TOOLCHAIN=stable rustc --version | awk '{print $2}')
    if [ "$have" != "$pinned" ]; then
      echo "error: rust-toolchain.toml pins Rust $pinned; rustup cannot download it here and the installed stable is $have" >&2
      exit 1
    fi
    sysroot=$(RUSTUP_TOOLCHAIN=stable rustc --print sysroot)
    ln -sfn "$sysroot" "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$pinned-$host"
    echo "registered the installed stable ($have) as toolchain $pinned-$host" >&2
  fi
fi
version=$(rustc --version | awk '{print $2}')
if [ "$version" != "$pinned" ]; then
  echo "error: rustc $version is in use, rust-toolchain.toml pins $pinned" >&2
  exit 1
fi
echo "$version"
