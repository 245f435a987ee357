#!/usr/bin/env bash
# End-to-end test of the .deb and .rpm: builds both with packaging/build-packages.sh,
# lints the .deb, installs it on THIS machine with dpkg (root; no running systemd
# needed), checks files, owners, modes, the user, the unit and the config, runs the
# installed binary as the service would (portico user, CAP_NET_BIND_SERVICE only, port
# 80), upgrades over itself, removes, purges and checks that nothing is left; then
# checks the .rpm's file list, flags and scripts with rpm.
#
#   sudo packaging/test-packages.sh       # last line: "N passed, M failed"; exit 1 on any failure
#
# Idempotent: a portico package left installed by an earlier run is purged first.
# Installs its prerequisites when missing (apt-get; cargo install via the build script).
# Do not run it on a machine where the portico package is in real use.
# shellcheck disable=SC2016,SC2317  # bash -c '...' bodies expand later; trap/indirect calls
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd)

export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR=never
export LC_ALL=C.UTF-8

pass=0
fail=0
work=$(mktemp -d)
run_pid=
cleanup() {
    if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
        kill -KILL "$run_pid" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT

ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }
# check DESCRIPTION COMMAND...: passes when COMMAND exits 0; prints its output if not.
check() {
    local desc=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        ok "$desc"
    else
        bad "$desc"
        sed 's/^/     | /' "$work/out" | head -40
    fi
}
# check_stat PATH TYPE OWNER:GROUP MODE (TYPE: file, dir)
check_stat() {
    local path=$1 type=$2 want_owner=$3 want_mode=$4 got
    got=$(stat -L -c '%F %U:%G %a' "$path" 2>&1)
    case $type in
        file) type="regular file" ;;
        dir) type="directory" ;;
    esac
    if [ "$got" = "$type $want_owner $want_mode" ] ||
        { [ "$type" = "regular file" ] && [ "$got" = "regular empty file $want_owner $want_mode" ]; }; then
        ok "$path: $type $want_owner $want_mode"
    else
        bad "$path: want $type $want_owner $want_mode, got: $got"
    fi
}
absent() { ! [ -e "$1" ] && ! [ -L "$1" ]; }
finish() {
    echo
    echo "$pass passed, $fail failed"
    if [ "$fail" -eq 0 ]; then exit 0; else exit 1; fi
}

# ---------------------------------------------------------------- prerequisites
if [ "$(id -u)" -ne 0 ]; then
    echo "test-packages: must run as root (it installs the .deb with dpkg)" >&2
    exit 2
fi
declare -A tool_pkg=(
    [rpm]=rpm [rpm2cpio]=rpm2cpio [cpio]=cpio [lintian]=lintian
    [systemd-analyze]=systemd [curl]=curl [man]=man-db [adduser]=adduser
    [setpriv]=util-linux [objcopy]=binutils [cmake]=cmake
)
missing=()
for tool in "${!tool_pkg[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${tool_pkg[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
        echo "test-packages: could not install ${missing[*]}" >&2
        exit 2
    fi
fi

# A package left by an interrupted run.
if dpkg-query -W -f='${Status}' portico 2>/dev/null | grep -qv '^unknown ok not-installed'; then
    echo "==> purging the portico package left installed by an earlier run"
    dpkg --purge portico >/dev/null
fi

# ---------------------------------------------------------------- build
echo "==> packaging/build-packages.sh"
if packaging/build-packages.sh >"$work/build.out" 2>"$work/build.err"; then
    ok "build-packages.sh built both packages"
else
    bad "build-packages.sh failed"
    tail -40 "$work/build.err" | sed 's/^/     | /'
    finish
fi
deb=$(grep '\.deb$' "$work/build.out")
rpmfile=$(grep '\.rpm$' "$work/build.out")
version=$(cargo pkgid --quiet | sed 's/.*[#@]//')
check "deb is target/packages/portico_${version}-1_amd64.deb" \
    test "$deb" = "target/packages/portico_${version}-1_$(dpkg --print-architecture).deb" -a -f "$deb"
check "rpm is target/packages/portico-${version}-1.x86_64.rpm" \
    test "$rpmfile" = "target/packages/portico-${version}-1.$(uname -m).rpm" -a -f "$rpmfile"

# ---------------------------------------------------------------- lintian
echo "==> lintian"
lintian --pedantic --display-info "$deb" >"$work/lintian" 2>&1
if grep -q '^E:' "$work/lintian"; then
    bad "lintian: errors"
else
    ok "lintian: no errors ($(grep -c '^W:' "$work/lintian") warnings, $(grep -c '^I:' "$work/lintian") info)"
fi
grep -E '^[EW]:' "$work/lintian" | sed 's/^/     | /'

# ---------------------------------------------------------------- .deb contents
dpkg-deb -e "$deb" "$work/control"
check "postinst never starts the unit on first install" \
    bash -c "! grep -Eq 'deb-systemd-invoke (start|\\\$_dh_action)' '$work/control/postinst'"
check "conffiles lists /etc/portico/portico.toml" \
    grep -qx /etc/portico/portico.toml "$work/control/conffiles"
check "deb's unit is systemd/portico.service" \
    bash -c "dpkg-deb --fsys-tarfile '$deb' | tar -xOf - ./usr/lib/systemd/system/portico.service | cmp - systemd/portico.service"

# ---------------------------------------------------------------- install
echo "==> dpkg -i $deb"
check "dpkg -i succeeds without a running systemd" dpkg -i "$deb"
check "dpkg says installed" bash -c "dpkg-query -W -f='\${Status}' portico | grep -qx 'install ok installed'"

check_stat /usr/bin/portico file root:root 755
check_stat /lib/systemd/system/portico.service file root:root 644
check_stat /etc/portico dir root:root 755
check_stat /etc/portico/portico.toml file root:root 644
check_stat /etc/portico/certs dir root:portico 750
check_stat /etc/portico/conf.d dir root:root 755
check_stat /usr/share/man/man1/portico.1.gz file root:root 644
check_stat /usr/share/doc/portico/copyright file root:root 644
check "installed config is packaging/portico.toml" cmp /etc/portico/portico.toml packaging/portico.toml

check "user portico exists as a system user with no login shell" \
    bash -c 'IFS=: read -r _ _ uid _ _ home shell < <(getent passwd portico) &&
             [ "$uid" -lt 1000 ] && [ "$shell" = /usr/sbin/nologin ] && [ "$home" = /var/lib/portico ]'
check "group portico exists" getent group portico
check "unit enabled (multi-user.target.wants symlink)" \
    test "$(readlink /etc/systemd/system/multi-user.target.wants/portico.service)" = /lib/systemd/system/portico.service
check "systemd-analyze verify: no complaint" \
    bash -c 'out=$(systemd-analyze verify /lib/systemd/system/portico.service 2>&1); rc=$?; echo "$out"; [ $rc -eq 0 ] && [ -z "$out" ]'
check "portico --help lists run and validate" \
    bash -c '/usr/bin/portico --help | grep -q "^  run" && /usr/bin/portico --help | grep -q "^  validate"'
check "man portico renders" bash -c 'MANWIDTH=80 man -P cat portico 2>&1 | grep -q "portico validate"'
check "portico validate -c /etc/portico/portico.toml (root)" \
    bash -c '/usr/bin/portico validate -c /etc/portico/portico.toml | grep -q "^ok: "'
check "portico validate as user portico (ExecStartPre)" \
    setpriv --reuid=portico --regid=portico --init-groups -- /usr/bin/portico validate -c /etc/portico/portico.toml

# ---------------------------------------------------------------- run as the service does
# User portico with CAP_NET_BIND_SERVICE as its only capability (the unit's
# AmbientCapabilities/CapabilityBoundingSet), serving the packaged config on port 80.
port_busy() { curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$1/" 2>/dev/null || [ $? -ne 7 ]; }
if port_busy 80 || port_busy 15000; then
    echo "skip running the service: port 80 or 15000 is already in use on this machine"
else
    echo "==> run as user portico with CAP_NET_BIND_SERVICE only"
    setpriv --reuid=portico --regid=portico --init-groups \
        --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
        --bounding-set=-all,+net_bind_service \
        -- /usr/bin/portico run -c /etc/portico/portico.toml >"$work/run.log" 2>&1 &
    run_pid=$!
    for _ in $(seq 50); do
        curl -sf -o /dev/null --max-time 1 http://127.0.0.1:15000/ready && break
        sleep 0.2
    done
    check "serves on port 80 as user portico (placeholder page)" \
        bash -c 'curl -sf --max-time 5 http://127.0.0.1:80/ | grep -q "Portico is running"'
    check "admin /ready and /healthz on 127.0.0.1:15000" \
        bash -c 'curl -sf --max-time 5 http://127.0.0.1:15000/ready && curl -sf --max-time 5 http://127.0.0.1:15000/healthz'
    check "process has CAP_NET_BIND_SERVICE only" \
        bash -c "grep -Eq '^CapEff:\\s+0000000000000400\$' /proc/$run_pid/status && grep -Eq '^CapBnd:\\s+0000000000000400\$' /proc/$run_pid/status"
    kill -HUP "$run_pid"
    sleep 1
    check "SIGHUP reloads and keeps serving" \
        bash -c "kill -0 $run_pid && curl -sf --max-time 5 http://127.0.0.1:80/ >/dev/null"
    kill -TERM "$run_pid"
    rc=124
    for _ in $(seq 150); do # 15s: the unit's TimeoutStopSec
        if ! kill -0 "$run_pid" 2>/dev/null; then
            wait "$run_pid"
            rc=$?
            break
        fi
        sleep 0.1
    done
    run_pid_done=$run_pid
    run_pid=
    if [ "$rc" -eq 0 ]; then
        ok "SIGTERM drains and exits 0 within TimeoutStopSec"
    else
        bad "SIGTERM: exit status $rc (124: still running after 15s)"
        kill -KILL "$run_pid_done" 2>/dev/null
        tail -20 "$work/run.log" | sed 's/^/     | /'
    fi
fi

# ---------------------------------------------------------------- upgrade keeps the conffile
echo "==> upgrade over itself with an edited conffile"
echo "# local edit by test-packages.sh" >>/etc/portico/portico.toml
check "dpkg -i again (upgrade) succeeds" dpkg -i --force-confold "$deb"
check "upgrade keeps the edited /etc/portico/portico.toml" \
    grep -qx "# local edit by test-packages.sh" /etc/portico/portico.toml
check "no .dpkg-new/.dpkg-old/.dpkg-dist left" \
    bash -c '! ls /etc/portico/*.dpkg-* 2>/dev/null | grep -q .'

# ---------------------------------------------------------------- remove, then purge
echo "==> dpkg --remove, then dpkg --purge"
check "dpkg --remove succeeds" dpkg --remove portico
check "remove takes the binary and the unit" \
    bash -c '! [ -e /usr/bin/portico ] && ! [ -e /lib/systemd/system/portico.service ]'
check "remove keeps /etc/portico/portico.toml and the user" \
    bash -c 'grep -q "local edit" /etc/portico/portico.toml && getent passwd portico >/dev/null'
check "dpkg --purge succeeds" dpkg --purge portico
for p in /etc/portico /var/lib/portico /usr/bin/portico /lib/systemd/system/portico.service \
    /etc/systemd/system/multi-user.target.wants/portico.service /etc/systemd/system/portico.service \
    /usr/share/doc/portico /usr/share/man/man1/portico.1.gz; do
    check "purge leaves no $p" absent "$p"
done
check "purge removes user and group portico" \
    bash -c '! getent passwd portico && ! getent group portico'
check "purge leaves no deb-systemd-helper state" \
    bash -c '! find /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked -name "*portico*" 2>/dev/null | grep -q .'
check "dpkg no longer knows portico" \
    bash -c '! dpkg-query -W -f="\${Status}" portico 2>/dev/null | grep -q installed'

# ---------------------------------------------------------------- .rpm
echo "==> rpm -qlp $rpmfile"
cat >"$work/rpm-expected" <<'EOF'
/etc/portico/portico.toml
/usr/bin/portico
/usr/lib/systemd/system/portico.service
/usr/lib/sysusers.d/portico.conf
/usr/share/doc/portico/README-operations.md
/usr/share/doc/portico/README.md
/usr/share/man/man1/portico.1.gz
EOF
rpm -qlp "$rpmfile" 2>/dev/null | sort >"$work/rpm-files"
if cmp -s "$work/rpm-expected" "$work/rpm-files"; then
    ok "rpm file list is as expected ($(wc -l <"$work/rpm-files") files)"
else
    bad "rpm file list differs (- expected, + got)"
    diff -u "$work/rpm-expected" "$work/rpm-files" | tail -n +3 | sed 's/^/     | /'
fi
check "rpm: name, version, release" \
    test "$(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE}' "$rpmfile" 2>/dev/null)" = "portico $version 1"
check "rpm: /etc/portico/portico.toml is %config(noreplace)" \
    bash -c "rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' '$rpmfile' 2>/dev/null | grep -qx 'cn /etc/portico/portico.toml'"
check "rpm: modes of binary, unit, config" \
    bash -c "rpm -qlvp '$rpmfile' 2>/dev/null | awk '{print \$1, \$3, \$4, \$NF}' | grep -c -e '^-rwxr-xr-x root root /usr/bin/portico$' -e '^-rw-r--r-- root root /usr/lib/systemd/system/portico.service$' -e '^-rw-r--r-- root root /etc/portico/portico.toml$' | grep -qx 3"
check "rpm: %pre creates the portico user" \
    bash -c "rpm -qp --scripts '$rpmfile' 2>/dev/null | grep -q 'useradd -r -g portico'"
check "rpm: %post enables the unit only when installing, never starts it" \
    bash -c "s=\$(rpm -qp --scripts '$rpmfile' 2>/dev/null); echo \"\$s\" | grep -q 'systemctl --no-reload enable portico.service' && ! echo \"\$s\" | grep -q 'systemctl start'"
check "rpm: requires useradd and libc" \
    bash -c "r=\$(rpm -qp --requires '$rpmfile' 2>/dev/null); echo \"\$r\" | grep -qx /usr/sbin/useradd && echo \"\$r\" | grep -q '^libc.so.6'"
mkdir -p "$work/rpmroot"
check "rpm payload extracts" bash -c "cd '$work/rpmroot' && rpm2cpio '$repo/$rpmfile' | cpio -idm --quiet"
check "rpm's unit is systemd/portico.service" cmp "$work/rpmroot/usr/lib/systemd/system/portico.service" systemd/portico.service
check "rpm's binary runs: portico --version" \
    bash -c "'$work/rpmroot/usr/bin/portico' --version | grep -qx 'portico $version'"
check "rpm's config validates" \
    bash -c "'$work/rpmroot/usr/bin/portico' validate -c '$work/rpmroot/etc/portico/portico.toml' | grep -q '^ok: '"

finish
