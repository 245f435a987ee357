#!/usr/bin/env bash
# Builds the release binary, then portico_<version>-1_<arch>.deb (cargo-deb) and
# portico-<version>-1.<arch>.rpm (cargo-generate-rpm) into target/packages/, from the
# [package.metadata.deb] and [package.metadata.generate-rpm] sections of Cargo.toml.
#
#   packaging/build-packages.sh            # from anywhere in the repository
#
# PORTICO_PACKAGE_PROFILE=dev packages the debug binary instead (no release build). .ci/run
# does this: its tests have just built that binary, and what the package test checks (files,
# owners, the unit, the scripts, the capabilities) does not depend on the optimizer.
#
# Installs what it needs when missing: cmake (apt; pingora's zlib-ng build) and the two
# cargo subcommands (cargo install --locked). Prints the paths of the two packages last.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-packages: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR=never
# ---------------------------------------------------------------- prerequisites
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v objcopy >/dev/null || need_apt+=(binutils)
command -v gzip >/dev/null || need_apt+=(gzip)
if [ ${#need_apt[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need_apt[*]} and no apt-get to install them"
    log "apt-get install ${need_apt[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
need_cargo=()
cargo deb --version >/dev/null 2>&1 || need_cargo+=(cargo-deb)
cargo generate-rpm --version >/dev/null 2>&1 || need_cargo+=(cargo-generate-rpm)
if [ ${#need_cargo[@]} -gt 0 ]; then
    log "cargo install --locked ${need_cargo[*]}"
    cargo install --locked --quiet "${need_cargo[@]}"
fi

# ---------------------------------------------------------------- checks
version=$(cargo pkgid --quiet | sed 's/.*[#@]//')
changelog_version=$(sed -n '1s/^portico (\([^)]*\)).*/\1/p' packaging/debian/changelog)
[ "$changelog_version" = "$version-1" ] ||
    die "packaging/debian/changelog starts with $changelog_version, Cargo.toml says $version: add a changelog entry for $version-1"

# ---------------------------------------------------------------- build
profile=${PORTICO_PACKAGE_PROFILE:-release}
case $profile in
    dev) profile_dir=debug ;;
    *) profile_dir=$profile ;;
esac
log "cargo build --profile $profile --locked (portico $version)"
cargo build --profile "$profile" --locked --bin portico

# The packages and the rpm's staged files go to ./target (Cargo.toml's rpm assets name
# target/package-stage); the binary is wherever cargo put it.
target_dir=${CARGO_TARGET_DIR:-target}
stage=target/package-stage
out=target/packages
rm -rf "$stage" "$out"
mkdir -p "$stage" "$out"
# Both packages take this stripped copy (the built binary itself is left alone).
objcopy --strip-unneeded "$target_dir/$profile_dir/portico" "$stage/portico"
gzip -9n <packaging/portico.1 >"$stage/portico.1.gz"

# The packages' file dates are clamped to the last commit's time (reproducible). Set only
# now: cargo rebuilds a binary when SOURCE_DATE_EPOCH differs from its last build.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || true)
    [ -n "$SOURCE_DATE_EPOCH" ] && export SOURCE_DATE_EPOCH
fi

log "cargo deb"
cargo deb --no-build --output "$out/" >&2
log "cargo generate-rpm"
cargo generate-rpm --output "$out/" >&2

deb=$(ls "$out"/portico_*.deb)
rpm=$(ls "$out"/portico-*.rpm)
log "built:"
echo "$deb"
echo "$rpm"
