#!/bin/bash
# Runs inside the arm64 root (called by run-tests.sh, in its own mount, PID and network
# namespaces): start PostgreSQL like .ci/ensure-services does on a host, then pytest.
set -euo pipefail
cd /opt/edgeos-src

# PostgreSQL from Debian's package, started without systemd (there is none in the chroot).
version=$(ls /etc/postgresql | sort -V | tail -1)
install -d -o postgres -g postgres -m 2775 /run/postgresql
# The cluster was created while the root was built; if the build host had a PostgreSQL of its own
# on 5432 then, pg_createcluster picked 5433. This run has its own network namespace: take 5432.
pg_conftool "$version" main set port 5432
pg_ctlcluster --skip-systemctl-redirect "$version" main start
pg_isready -q -h 127.0.0.1 -p 5432 -t 60 || { echo "in-root: PostgreSQL not on 5432" >&2; exit 1; }
runuser -u postgres -- psql -qtAc \
    "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='edgeos_test') THEN
       CREATE ROLE edgeos_test LOGIN SUPERUSER PASSWORD 'edgeos_test'; END IF; END \$\$;" >/dev/null
export EDGEOS_TEST_PG_DSN=postgresql://edgeos_test:edgeos_test@127.0.0.1:5432/postgres

echo "test root: $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m), $(/opt/edgeos-venv/bin/python -V), PostgreSQL $version," \
    "$(/usr/sbin/mosquitto -h 2>/dev/null | head -1)"
rc=0
/opt/edgeos-venv/bin/python -m pytest "$@" || rc=$?
pg_ctlcluster --skip-systemctl-redirect "$version" main stop -m fast || true
exit $rc
