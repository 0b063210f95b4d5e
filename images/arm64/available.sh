#!/usr/bin/env bash
# Exit 0 when this host can run the arm64 lane (installing mmdebstrap/qemu-user-static and
# enabling binfmt_misc if needed); otherwise exit 1 with the reason on stderr. .ci/run asks this.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
arm64_ensure_tools
