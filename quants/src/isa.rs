//! Instruction-set tiers and their runtime detection. The active tier is chosen once, at first
//! use: the best one this CPU supports, or the one named by `GGRUN_ISA` (scalar, avx2, avx512,
//! avxvnni, avx512vnni, neon, neon-dotprod, neon-i8mm) when this CPU supports it. AMX is never used: some
//! VMs list it in /proc/cpuinfo but fault on its instructions. Also here: how far ahead the x86 packed
//! kernels prefetch their weights, which depends on the CPU's vendor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A kernel tier. Higher tiers fall back to lower ones kernel by kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL (plus the AVX2 tier).
    Avx512,
    /// AVX2 with AVX-VNNI (the VEX `vpdpbusd` of Intel client cores without AVX-512).
    AvxVnni,
    /// AVX-512 with VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// AArch64 Advanced SIMD.
    Neon,
    /// NEON with the dot-product extension (`sdot`).
    NeonDotprod,
    /// NEON with `sdot` and the int8 matrix multiply (`smmla`, FEAT_I8MM).
    NeonI8mm,
}

impl Isa {
    pub const ALL: [Isa; 8] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::AvxVnni,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonDotprod,
        Isa::NeonI8mm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDotprod => "neon-dotprod",
            Isa::NeonI8mm => "neon-i8mm",
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run kernels of this tier.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.is_available() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.is_available() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::NeonI8mm => {
                Isa::NeonDotprod.is_available() && std::arch::is_aarch64_feature_detected!("i8mm")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether this is one of the x86-64 SIMD tiers (which all include AVX2).
    pub fn is_x86(self) -> bool {
        matches!(
            self,
            Isa::Avx2 | Isa::Avx512 | Isa::AvxVnni | Isa::Avx512Vnni
        )
    }

    /// Every tier this CPU supports, lowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The best tier this CPU supports.
    pub fn detect() -> Isa {
        *Isa::available().last().expect("scalar is always available")
    }
}

/// Why the active tier is what it is: the detected tier, and a note when `GGRUN_ISA` asked for one
/// this CPU lacks or that does not exist.
#[derive(Clone, Debug)]
pub struct Selection {
    pub active: Isa,
    pub detected: Isa,
    pub warning: Option<String>,
}

fn select(request: Option<&str>) -> Selection {
    let detected = Isa::detect();
    let Some(req) = request.filter(|s| !s.trim().is_empty()) else {
        return Selection {
            active: detected,
            detected,
            warning: None,
        };
    };
    match Isa::from_name(req) {
        Some(isa) if isa.is_available() => Selection {
            active: isa,
            detected,
            warning: None,
        },
        Some(isa) => Selection {
            active: detected,
            detected,
            warning: Some(format!(
                "GGRUN_ISA={}: this CPU lacks it; using {}",
                isa.name(),
                detected.name()
            )),
        },
        None => Selection {
            active: detected,
            detected,
            warning: Some(format!(
                "GGRUN_ISA={req}: unknown (expected one of {}); using {}",
                Isa::ALL.map(|i| i.name()).join(", "),
                detected.name()
            )),
        },
    }
}

/// The tier selected for this process (detected once, then fixed).
pub fn selection() -> &'static Selection {
    static SEL: OnceLock<Selection> = OnceLock::new();
    SEL.get_or_init(|| select(std::env::var("GGRUN_ISA").ok().as_deref()))
}

/// The active tier.
pub fn active() -> Isa {
    selection().active
}

/// Bytes ahead of the block being read at which the x86 packed kernels prefetch their weights
/// into L1 (0: none), unless `GGRUN_CPU_PREFETCH=BYTES` says otherwise. Measured
/// (BENCHMARKS.md, "Weight prefetch"): on a 16-core Intel Xeon decode streams 25–40% faster
/// with 8 KiB; on the AMD Zen 4 VM it gained nothing at 2–4 KiB and lost at 8 KiB, so other
/// vendors get none.
pub fn weight_prefetch_bytes() -> usize {
    let v = PREFETCH.load(Ordering::Relaxed);
    if v != UNSET {
        return v;
    }
    let v = std::env::var("GGRUN_CPU_PREFETCH")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .map(|b| b.min(MAX_PREFETCH))
        .unwrap_or_else(|| match vendor().as_str() {
            "GenuineIntel" => 8192,
            _ => 0,
        });
    PREFETCH.store(v, Ordering::Relaxed);
    v
}

/// Asks the CPU to bring the 64-byte lines of `data` from offset `from` (rounded down to a line)
/// up to `to` into L1 (x86; nothing elsewhere), and returns the offset of the first line not
/// asked for, where a stream's next call starts. The range may run past the end of `data`: a
/// prefetch never faults and nothing is read.
#[inline]
pub fn prefetch(data: &[u8], from: usize, to: usize) -> usize {
    let mut at = from & !63;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let base = data.as_ptr();
        while at < to {
            // SAFETY: SSE is part of the x86-64 baseline, and a prefetch is a hint: it reads
            // nothing into the program and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at).cast()) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = data;
        at = at.max(to);
    }
    at
}

/// Sets the prefetch distance for this process (tests run the kernels both ways).
pub fn set_weight_prefetch_bytes(bytes: usize) {
    PREFETCH.store(bytes.min(MAX_PREFETCH), Ordering::Relaxed);
}

const UNSET: usize = usize::MAX;
const MAX_PREFETCH: usize = 1 << 20;
static PREFETCH: AtomicUsize = AtomicUsize::new(UNSET);

/// The CPU vendor string (`GenuineIntel`, `AuthenticAMD`, ...), empty off x86.
pub fn vendor() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 0: the vendor's twelve bytes in ebx, edx, ecx.
        let r = std::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_is_a_cpuid_string_on_x86() {
        let v = vendor();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(v.len(), 12, "{v:?}");
            assert!(v.is_ascii(), "{v:?}");
        } else {
            assert!(v.is_empty());
        }
    }

    #[test]
    fn override_is_clamped_to_what_the_cpu_has() {
        assert_eq!(select(Some("scalar")).active, Isa::Scalar);
        assert_eq!(select(None).active, Isa::detect());
        let bad = select(Some("avx9000"));
        assert_eq!(bad.active, Isa::detect());
        assert!(bad.warning.unwrap().contains("unknown"));
        for isa in Isa::ALL {
            let s = select(Some(isa.name()));
            assert_eq!(
                s.active,
                if isa.is_available() {
                    isa
                } else {
                    Isa::detect()
                }
            );
        }
    }
}
