//! The Mamba-2 state-row kernel: one row of a head's SSM state updated for one token and read
//! out, `s = s·dA + B·(x·dt)` then `Σ s·C`. It is the inner loop of the selective scan. Sixteen
//! lanes accumulate elements k, k+16, …; the lanes are then summed as a tree (k+8, k+4, k+2,
//! k+1), the same on every tier, so the SIMD twins equal this reference bit for bit.

/// `row(s, b, c, da, xdt)`: updates `s` in place and returns Σ s·c.
pub type SsmRowFn = fn(&mut [f32], &[f32], &[f32], f32, f32) -> f32;

pub(crate) const LANES: usize = 16;

/// The scalar reference.
pub fn ssm_row_scalar(s: &mut [f32], b: &[f32], c: &[f32], da: f32, xdt: f32) -> f32 {
    let n = s.len().min(b.len()).min(c.len());
    let body = n / LANES * LANES;
    let mut acc = [0f32; LANES];
    for i in (0..body).step_by(LANES) {
        for k in 0..LANES {
            let v = s[i + k].mul_add(da, b[i + k] * xdt);
            s[i + k] = v;
            acc[k] = v.mul_add(c[i + k], acc[k]);
        }
    }
    let mut sum = reduce_tree(acc);
    for i in body..n {
        let v = s[i].mul_add(da, b[i] * xdt);
        s[i] = v;
        sum = v.mul_add(c[i], sum);
    }
    sum
}

/// Σ of sixteen lanes as (k + k+8), then (k + k+4), (k + k+2), (k + k+1).
pub(crate) fn reduce_tree(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for k in 0..w {
            a[k] += a[k + w];
        }
        w /= 2;
    }
    a[0]
}

/// The state-row kernel of the active tier.
pub fn ssm_row_fn() -> SsmRowFn {
    ssm_row_for(crate::isa::active())
}

/// The state-row kernel of `isa` (scalar where the tier has none).
pub fn ssm_row_for(isa: crate::Isa) -> SsmRowFn {
    #[cfg(target_arch = "x86_64")]
    if isa.is_x86() && isa.is_available() {
        return crate::x86::ssm_row;
    }
    let _ = isa;
    ssm_row_scalar
}
