#!/usr/bin/env bash
# The project's checks: formatting, clippy, the CUDA kernels' syntax, the whole test suite on this CPU (every SIMD tier it
# has), the quant kernels' tests on aarch64 under qemu (NEON, +dotprod, +i8mm), and the runner
# itself there on a fixture.
# Needs what .ci/run installs; run `bash .ci/run` on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The CUDA kernels' syntax and types, by the host compiler (no GPU or toolkit here; NVRTC on the
# device compiles them for real: scripts/gpu-test.sh).
g++ -std=c++17 -fsyntax-only -Werror=return-type -Wno-unknown-pragmas \
  -include scripts/cuda-host-stub.h -x c++ src/backend/cuda/kernels.cu

# The tiers this CPU advertises must be detected and tested, not silently skipped.
expect=""
grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && expect="avx2"
grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && expect="$expect,avx512"
grep -qw avx512_vnni /proc/cpuinfo && expect="$expect,avx512vnni"
grep -qw avx_vnni /proc/cpuinfo && grep -qw avx2 /proc/cpuinfo && expect="$expect,avxvnni"
export GGRUN_EXPECT_ISA="${expect#,}"
echo "expecting SIMD tiers: ${GGRUN_EXPECT_ISA:-none}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
GGRUN_SMOLLM2="$(scripts/fetch-smollm2.sh)" GGRUN_TEMPLATES="$(scripts/fetch-templates.sh)" \
  cargo test --workspace 2>&1 | tee -a "$log"

GGRUN_EXPECT_ISA=neon,neon-dotprod,neon-i8mm cargo test -p ggrun-quants --tests \
  --target aarch64-unknown-linux-gnu 2>&1 | tee -a "$log"

# A short run of each fuzz target from its corpus (cargo-fuzz on this stable toolchain, no
# sanitizer: the targets look for panics, hangs and huge allocations). New inputs go to a
# scratch directory, not the committed corpus.
scratch="$(mktemp -d)"
trap 'rm -f "$log"; rm -rf "$scratch"' EXIT
for t in gguf_parse tokenize template request; do
  dict=""
  [ "$t" = template ] && dict="-dict=dicts/jinja.dict"
  mkdir -p "$scratch/$t"
  if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="${GGRUN_FUZZ_SECONDS:-30}" -timeout=10 -rss_limit_mb=4096 $dict) \
      >"$scratch/$t.log" 2>&1; then
    tail -40 "$scratch/$t.log"
    echo "fuzz target $t failed"
    exit 1
  fi
  echo "fuzz $t: $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$scratch/$t.log" | tail -1)"
done

# The runner itself on aarch64 under qemu: on the Q8_0 fixture (every legacy matrix packed) the
# packed NEON kernels give the x86 packed path's logits bit for bit, at every NEON tier (files
# with unpacked legacy matrices differ in the last bits: x86's single-row dots sum in 8 lanes).
fixtures="${GGRUN_FIXTURES:-../shared/fixtures}"
m="$fixtures/nemo-tiny-q8_0.gguf"
toks=1,2,3,4,5,6,7,8,9,10,11,12
cargo run -q --bin ggrun -- logits -m "$m" --tokens $toks --out "$scratch/x86.f32" -t 2 >/dev/null
for isa in neon neon-dotprod neon-i8mm; do
  GGRUN_ISA=$isa cargo run -q --target aarch64-unknown-linux-gnu --bin ggrun -- \
    logits -m "$m" --tokens $toks --out "$scratch/arm-$isa.f32" -t 2 >/dev/null
  if ! cmp -s "$scratch/x86.f32" "$scratch/arm-$isa.f32"; then
    echo "aarch64 ($isa): the logits differ from x86's"
    exit 1
  fi
done
echo "aarch64 runner: packed NEON logits equal x86's bit for bit (neon, neon-dotprod, neon-i8mm)"

# One closing line over every test binary above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
