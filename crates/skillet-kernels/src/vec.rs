//! Vector loops compiled once per instruction set (AVX-512, AVX2+FMA,
//! baseline) and picked at run time, so the binary stays portable while
//! the machine it runs on gets its widest registers. Reductions keep 16
//! independent lanes so the compiler can vectorize them without
//! reassociating floating-point sums on its own.

/// Defines `fn $name` whose body is compiled for AVX-512, for AVX2+FMA and
/// for the baseline, dispatching on what the running CPU has.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features v3 was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Lanes of the split reductions (one AVX-512 register of f32).
pub(crate) const LANES: usize = 16;

/// `e^x` in f32 to about 2 ulp (Cephes' `expf` polynomial on a reduced
/// range), written without calls or branches so loops over it vectorize.
/// Inputs below -87 give 0 (so a -∞ score gives probability 0), above 88
/// saturate at `e^88`; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    let e = (t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32).wrapping_add(127) as u32;
    let v = p * f32::from_bits(e << 23);
    if x < -87.0 { 0.0 } else { v }
}

/// The largest element (−∞ for an empty slice; NaN-blind). Inlined into
/// multiversioned callers; [`max`] is its dispatching form.
#[inline(always)]
pub(crate) fn max_in(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

/// Replaces each `v` by `e^(v - shift)` and returns the sum: 16 lane sums
/// in order, then the lanes and the tail in order, so the result depends
/// on the slice's contents alone. Inlined into multiversioned callers.
#[inline(always)]
pub(crate) fn exp_shifted_sum_in(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - shift);
            acc[l] += c[l];
        }
    }
    let mut s = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        s += *v;
    }
    acc.iter().sum::<f32>() + s
}

/// `Σ a_i b_i`, summed in the fixed order of [`exp_shifted_sum_in`].
/// Inlined into multiversioned callers.
#[inline(always)]
pub(crate) fn dot_in(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// `x *= a`. Inlined into multiversioned callers.
#[inline(always)]
pub(crate) fn scale_in(x: &mut [f32], a: f32) {
    for v in x {
        *v *= a;
    }
}

multiversion! {
    /// The largest element (−∞ for an empty slice; NaN-blind).
    pub(crate) fn max(x: &[f32]) -> f32 {
        max_in(x)
    }
}

multiversion! {
    /// Replaces each `v` by `e^(v - shift)` and returns the sum.
    pub(crate) fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        exp_shifted_sum_in(x, shift)
    }
}

multiversion! {
    /// `Σ a_i b_i`.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_in(a, b)
    }
}

multiversion! {
    /// `x *= a`.
    pub(crate) fn scale(x: &mut [f32], a: f32) {
        scale_in(x, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_handles_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn reductions_match_sequential() {
        let x: Vec<f32> = (0..53).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        assert_eq!(max(&x), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let d: f32 = x.iter().map(|v| v * v).sum();
        assert!((dot(&x, &x) - d).abs() < 1e-4);
        let mut e = x.clone();
        let s = exp_shifted_sum(&mut e, 5.0);
        let want: f32 = x.iter().map(|v| (v - 5.0).exp()).sum();
        assert!((s - want).abs() / want < 1e-6);
        assert!((e[3] - (x[3] - 5.0).exp()).abs() < 1e-6);
    }
}
