#!/usr/bin/env bash
# The project's checks: formatting, clippy, the whole test suite on this CPU (every SIMD tier it
# has), and the quant kernels' tests on aarch64 under qemu (NEON and NEON+dotprod).
# Needs what .ci/run installs; run `bash .ci/run` on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

# The tiers this CPU advertises must be detected and tested, not silently skipped.
expect=""
grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && expect="avx2"
grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && expect="$expect,avx512"
grep -qw avx512_vnni /proc/cpuinfo && expect="$expect,avx512vnni"
export GGRUN_EXPECT_ISA="${expect#,}"
echo "expecting SIMD tiers: ${GGRUN_EXPECT_ISA:-none}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
GGRUN_SMOLLM2="$(scripts/fetch-smollm2.sh)" GGRUN_TEMPLATES="$(scripts/fetch-templates.sh)" \
  cargo test --workspace 2>&1 | tee -a "$log"

GGRUN_EXPECT_ISA=neon,neon-dotprod cargo test -p ggrun-quants --tests \
  --target aarch64-unknown-linux-gnu 2>&1 | tee -a "$log"

# One closing line over every test binary above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
