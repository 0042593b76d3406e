#!/usr/bin/env bash
# The cluster engines the test suite runs for real on 127.0.0.1 (docs/cluster.md): Slurm with
# accounting (slurm-wlm, slurmdbd, munge, mariadb-server) and PostgreSQL. Debian packages,
# installed when we may (root + apt), else we say how. Their services are not started here:
# the tests start private instances (scripts/clusters/) and stop them by PID.
set -euo pipefail
need=()
for tool in /usr/sbin/slurmctld:slurm-wlm /usr/sbin/slurmdbd:slurmdbd /usr/sbin/munged:munge \
            /usr/sbin/mariadbd:mariadb-server /usr/lib/postgresql:postgresql; do
  [ -e "${tool%%:*}" ] || need+=("${tool##*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[setup] note: the Slurm and PostgreSQL tests need: sudo apt-get install ${need[*]}"
  exit 0
fi
echo "[setup] installing Debian packages: ${need[*]} (~30 s)"
export DEBIAN_FRONTEND=noninteractive
# Keep the packages from starting their system-wide daemons (ports 3306, 5432, Slurm's own).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; own_policy=1; fi
trap 'if [ $own_policy = 1 ]; then rm -f "$policy"; fi' EXIT
apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } \
  || { echo "[setup] error: could not install ${need[*]}; the cluster tests will fail and say so" >&2; exit 0; }
