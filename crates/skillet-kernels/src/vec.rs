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

/// `e^x` in f32 to within 1.7e-7 relative (a degree-5 minimax polynomial,
/// in Horner form, on the range reduced to `|r| ≤ ln 2 / 2`), written
/// without calls or branches so loops over it vectorize.
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
    let [c5, c4, c3, c2] = EXP_POLY;
    let p = ((((c5 * r + c4) * r + c3) * r + c2) * r + 1.0) * r + 1.0;
    let e = (t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32).wrapping_add(127) as u32;
    let v = p * f32::from_bits(e << 23);
    if x < -87.0 { 0.0 } else { v }
}

/// The coefficients of `r⁵ … r²` of [`exp`]'s polynomial `1 + r + c₂r² + …`:
/// minimax for the relative error on `|r| ≤ ln 2 / 2` (Remez exchange
/// with `c₀ = c₁ = 1` fixed; 1.05e-7 before rounding to f32).
const EXP_POLY: [f32; 4] = [8.312_525e-3, 4.189_011_5e-2, 1.666_711_4e-1, 4.999_923e-1];

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
    /// [`exp_shifted_sum`] where the CPU lacks both AVX-512 and AVX2 + FMA.
    fn exp_shifted_sum_portable(x: &mut [f32], shift: f32) -> f32 {
        exp_shifted_sum_in(x, shift)
    }
}

/// Replaces each `v` by `e^(v - shift)` and returns the sum, summed in the
/// order of [`exp_shifted_sum_in`]. With AVX-512 the exponentials are
/// [`exp16`]'s, with AVX2 and FMA [`exp8`]'s (fused multiply-adds; within
/// a few ulp of [`exp`]).
pub(crate) fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature.
            return unsafe { exp_shifted_sum_avx512(x, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features.
            return unsafe { exp_shifted_sum_avx2(x, shift) };
        }
    }
    exp_shifted_sum_portable(x, shift)
}

/// [`exp_shifted_sum`] on AVX2 and FMA: two registers of 8 lanes at a
/// time (the 16 lane sums of [`exp_shifted_sum_in`]), the tail as the
/// portable loop does it.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_sum_avx2(x: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let by = _mm256_set1_ps(shift);
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 values.
        unsafe {
            let p = c.as_mut_ptr();
            let a = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), by));
            let b = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(8)), by));
            _mm256_storeu_ps(p, a);
            _mm256_storeu_ps(p.add(8), b);
            lo = _mm256_add_ps(lo, a);
            hi = _mm256_add_ps(hi, b);
        }
    }
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` holds 16 values.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    }
    let mut s = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        s += *v;
    }
    lanes.iter().sum::<f32>() + s
}

/// [`exp`] of 8 lanes with fused multiply-adds, the range reduced by
/// rounding (`vroundps`) and the power of two made in the exponent's
/// bits: the same polynomial and edges (below -87 gives 0, above 88
/// saturates, NaN stays NaN).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = _mm256_set1_ps;
    let dead = _mm256_cmp_ps::<_CMP_LT_OQ>(x, set(-87.0));
    // `max`/`min` return their second operand where either is NaN.
    let xc = _mm256_min_ps(set(88.0), _mm256_max_ps(set(-87.0), x));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        set(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, set(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, set(-2.121_944_4e-4), r);
    let [c5, c4, c3, c2] = EXP_POLY;
    let mut p = _mm256_fmadd_ps(set(c5), r, set(c4));
    p = _mm256_fmadd_ps(p, r, set(c3));
    p = _mm256_fmadd_ps(p, r, set(c2));
    p = _mm256_fmadd_ps(p, r, set(1.0));
    p = _mm256_fmadd_ps(p, r, set(1.0));
    // 2ⁿ for n in -126..=127 (the clamp keeps it there; NaN's lanes stay
    // NaN through `p`).
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)))
}

/// [`exp_shifted_sum`] on AVX-512: 16 lanes at a time, the tail through a
/// masked load and store.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_sum_avx512(x: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let shift = _mm512_set1_ps(shift);
    let mut acc = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 values.
        unsafe {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), shift));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm512_add_ps(acc, e);
        }
    }
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` holds 16 values.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
    let rest = chunks.into_remainder();
    let mut s = 0f32;
    if !rest.is_empty() {
        let mask = ((1u32 << rest.len()) - 1) as u16;
        // SAFETY: the mask covers the `rest.len() < 16` values there are.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
            let e = exp16(_mm512_sub_ps(v, shift));
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, e);
        }
        for &v in rest.iter() {
            s += v;
        }
    }
    lanes.iter().sum::<f32>() + s
}

/// [`exp`] of 16 lanes with fused multiply-adds, the range reduced by
/// rounding (`vrndscaleps`) and the power of two put back by `vscalefps`:
/// the same polynomial and edges (below -87 gives 0, above 88 saturates,
/// NaN stays NaN) in about half the instructions.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    let dead = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, set(-87.0));
    // `max`/`min` return their second operand where either is NaN.
    let xc = _mm512_min_ps(set(88.0), _mm512_max_ps(set(-87.0), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, set(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, set(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, set(-2.121_944_4e-4), r);
    let [c5, c4, c3, c2] = EXP_POLY;
    let mut p = _mm512_fmadd_ps(set(c5), r, set(c4));
    p = _mm512_fmadd_ps(p, r, set(c3));
    p = _mm512_fmadd_ps(p, r, set(c2));
    p = _mm512_fmadd_ps(p, r, set(1.0));
    p = _mm512_fmadd_ps(p, r, set(1.0));
    _mm512_maskz_scalef_ps(!dead, p, n)
}

multiversion! {
    /// `Σ a_i b_i`.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_in(a, b)
    }
}

multiversion! {
    /// `x_i = p_i (x_i − shift)`: attention's score gradients from the
    /// probabilities `p` and their gradients `x`.
    pub(crate) fn times_shifted(x: &mut [f32], p: &[f32], shift: f32) {
        for (v, &pv) in x.iter_mut().zip(p) {
            *v = pv * (*v - shift);
        }
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
    fn vector_exp_agrees_with_the_scalar_one() {
        let mut x: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.00899).collect();
        x.extend([
            f32::NEG_INFINITY,
            -1000.0,
            1000.0,
            88.5,
            f32::NAN,
            0.0,
            -0.0,
        ]);
        let shift = 0.25;
        let mut got = x.clone();
        exp_shifted_sum(&mut got, shift);
        for (&v, &g) in x.iter().zip(&got) {
            let want = exp(v - shift);
            if want.is_nan() {
                assert!(g.is_nan(), "exp({v}) gave {g}");
                continue;
            }
            let ulps = (g.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(
                ulps <= 2 || (g - want).abs() <= f32::MIN_POSITIVE,
                "exp({v}): {g} vs {want}"
            );
        }
        // Every length of tail, against the plain loop's sum.
        for len in 0..40 {
            let v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
            let (mut a, mut b) = (v.clone(), v.clone());
            let sa = exp_shifted_sum(&mut a, 1.0);
            let sb = exp_shifted_sum_in(&mut b, 1.0);
            assert!(
                (sa - sb).abs() <= 1e-6 * sb.abs().max(1.0),
                "{len}: {sa} vs {sb}"
            );
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 2e-7 * q.abs(), "{len}: {p} vs {q}");
            }
        }
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
