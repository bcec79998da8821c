//! Products with one side only `r` wide: LoRA's factors, where `r` (8 or
//! 16, say) is far below the model's width. [`times_t`] is `x Aᵀ`,
//! [`add_times`] is `y += s · u Z` and [`t_times`] is `s · gᵀ x`.
//!
//! The `gemm` crate tiles for wide outputs. On these shapes it runs at
//! about a quarter of its rate: its tiles are 16 rows by 6 columns, and
//! `r = 8` half-fills them. Here up to 8 of the `r` columns at a time stay
//! in registers while the wide operand streams past once.
//!
//! Every output element is summed in a fixed order, whatever the thread
//! count. Without AVX-512 the same products go through [`matmul`].

use rayon::prelude::*;

use crate::gemm::{Out, View, matmul};

/// Rows per parallel task of [`times_t`] and [`add_times`].
const ROWS: usize = 32;
/// Columns per parallel task of [`t_times`] (two registers).
const COLS: usize = 32;

/// `out (m × r) = x (m × k) · aᵀ` for `a` of `r` rows of `k`.
pub(crate) fn times_t(x: &[f32], [m, k, r]: [usize; 3], a: &[f32], out: &mut [f32]) {
    assert!(x.len() >= m * k && a.len() >= r * k && out.len() >= m * r);
    #[cfg(target_arch = "x86_64")]
    if r > 0 && k > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        out[..m * r]
            .par_chunks_mut(ROWS * r)
            .zip(x[..m * k].par_chunks(ROWS * k))
            .for_each(|(out, x)| {
                // SAFETY: the CPU has AVX-512F; the chunks hold whole rows
                // of `k` and of `r`, and `a` holds `r` rows of `k`.
                unsafe { avx512::times_t(x, k, a, r, out) }
            });
        return;
    }
    let (xv, av) = (View::rows(x, k), View::rows(a, k).t());
    matmul(m, r, k, xv, av, Out::new(out, r), true);
}

/// `y (m × n) += s · u (m × r) · z (r × n)`.
pub(crate) fn add_times(y: &mut [f32], [m, r, n]: [usize; 3], u: &[f32], z: &[f32], s: f32) {
    assert!(y.len() >= m * n && u.len() >= m * r && z.len() >= r * n);
    #[cfg(target_arch = "x86_64")]
    if r > 0 && n > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        y[..m * n]
            .par_chunks_mut(ROWS * n)
            .zip(u[..m * r].par_chunks(ROWS * r))
            .for_each(|(y, u)| {
                // SAFETY: the CPU has AVX-512F; the chunks hold whole rows
                // of `n` and of `r`, and `z` holds `r` rows of `n`.
                unsafe { avx512::add_times(y, n, u, r, z, s) }
            });
        return;
    }
    let dst = Out::new(y, n).accumulate().scaled(s);
    matmul(m, n, r, View::rows(u, r), View::rows(z, n), dst, true);
}

/// `out (r × n) = s · gᵀ · x` for `g` (`m × r`) and `x` (`m × n`).
pub(crate) fn t_times(g: &[f32], [m, r, n]: [usize; 3], x: &[f32], s: f32, out: &mut [f32]) {
    assert!(g.len() >= m * r && x.len() >= m * n && out.len() >= r * n);
    #[cfg(target_arch = "x86_64")]
    if r > 0 && n > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(COLS))
            .into_par_iter()
            .map(|b| {
                let (c, cols) = (b * COLS, COLS.min(n - b * COLS));
                let mut block = vec![0f32; r * cols];
                // SAFETY: the CPU has AVX-512F; `g` holds `m` rows of
                // `r`, `x` `m` rows of `n` with `c + cols ≤ n`, and
                // `block` `r` rows of `cols`.
                unsafe { avx512::t_times(g, r, &x[c..], n, m, cols, s, &mut block) };
                block
            })
            .collect();
        for (b, block) in blocks.iter().enumerate() {
            let (c, cols) = (b * COLS, COLS.min(n - b * COLS));
            for (row, part) in out.chunks_exact_mut(n).zip(block.chunks_exact(cols)) {
                row[c..c + cols].copy_from_slice(part);
            }
        }
        return;
    }
    let dst = Out::new(out, n).scaled(s);
    matmul(r, n, m, View::rows(g, r).t(), View::rows(x, n), dst, true);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The first `n` of 16 lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// Calls `$f::<R, N>` for the runtime `$rows` (1 or 2) and `$n`
    /// (1 to 8).
    macro_rules! dispatch {
        ($f:ident, $rows:expr, $n:expr, ($($arg:expr),*)) => {
            match ($rows, $n) {
                (2, 8) => $f::<2, 8>($($arg),*),
                (2, 7) => $f::<2, 7>($($arg),*),
                (2, 6) => $f::<2, 6>($($arg),*),
                (2, 5) => $f::<2, 5>($($arg),*),
                (2, 4) => $f::<2, 4>($($arg),*),
                (2, 3) => $f::<2, 3>($($arg),*),
                (2, 2) => $f::<2, 2>($($arg),*),
                (2, _) => $f::<2, 1>($($arg),*),
                (_, 8) => $f::<1, 8>($($arg),*),
                (_, 7) => $f::<1, 7>($($arg),*),
                (_, 6) => $f::<1, 6>($($arg),*),
                (_, 5) => $f::<1, 5>($($arg),*),
                (_, 4) => $f::<1, 4>($($arg),*),
                (_, 3) => $f::<1, 3>($($arg),*),
                (_, 2) => $f::<1, 2>($($arg),*),
                (_, _) => $f::<1, 1>($($arg),*),
            }
        };
    }

    /// [`super::times_t`] on whole rows `x` (of `k`) into `out` (of `r`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x.len() / k == out.len() / r` and `a` holds
    /// `r` rows of `k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn times_t(x: &[f32], k: usize, a: &[f32], r: usize, out: &mut [f32]) {
        let m = x.len() / k;
        debug_assert!(out.len() >= m * r && a.len() >= r * k);
        for i in (0..m).step_by(2) {
            let rows = (m - i).min(2);
            for j in (0..r).step_by(8) {
                let n = (r - j).min(8);
                // SAFETY: rows `i .. i + rows` of `x` and `out`, and rows
                // `j .. j + n` of `a`, are within their slices.
                unsafe {
                    let x = x.as_ptr().add(i * k);
                    let a = a.as_ptr().add(j * k);
                    let out = out.as_mut_ptr().add(i * r + j);
                    dispatch!(dots, rows, n, (x, k, a, out, r));
                }
            }
        }
    }

    /// `out[q·r + j] = x_q · a_j` for `R` rows `x_q` and `N` rows `a_j`,
    /// all of length `k` (16 lanes summed apart, then across).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn dots<const R: usize, const N: usize>(
        x: *const f32,
        k: usize,
        a: *const f32,
        out: *mut f32,
        r: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut c = 0;
        while c < k {
            let mask = lanes(k - c);
            // SAFETY: the masked lanes are within each row (caller).
            unsafe {
                let xs: [__m512; R] =
                    std::array::from_fn(|q| _mm512_maskz_loadu_ps(mask, x.add(q * k + c)));
                for j in 0..N {
                    let av = _mm512_maskz_loadu_ps(mask, a.add(j * k + c));
                    for q in 0..R {
                        acc[q][j] = _mm512_fmadd_ps(xs[q], av, acc[q][j]);
                    }
                }
            }
            c += 16;
        }
        for (q, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: `out` has `R` rows of `r ≥ N` (caller).
                unsafe { *out.add(q * r + j) = _mm512_reduce_add_ps(*v) };
            }
        }
    }

    /// [`super::add_times`] on whole rows `y` (of `n`) and `u` (of `r`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `y.len() / n == u.len() / r` and `z` holds
    /// `r` rows of `n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_times(
        y: &mut [f32],
        n: usize,
        u: &[f32],
        r: usize,
        z: &[f32],
        s: f32,
    ) {
        let m = y.len() / n;
        debug_assert!(u.len() >= m * r && z.len() >= r * n);
        for i in (0..m).step_by(2) {
            let rows = (m - i).min(2);
            for j in (0..r).step_by(8) {
                let cols = (r - j).min(8);
                // SAFETY: rows `i .. i + rows` of `y` and `u`, and rows
                // `j .. j + cols` of `z`, are within their slices.
                unsafe {
                    let y = y.as_mut_ptr().add(i * n);
                    let u = u.as_ptr().add(i * r + j);
                    let z = z.as_ptr().add(j * n);
                    dispatch!(spread, rows, cols, (y, n, u, r, z, s));
                }
            }
        }
    }

    /// `y_q += s · Σ_j u[q·r + j] z_j` for `R` rows `y_q` and `N` rows
    /// `z_j`, all of length `n`, `j` in order.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn spread<const R: usize, const N: usize>(
        y: *mut f32,
        n: usize,
        u: *const f32,
        r: usize,
        z: *const f32,
        s: f32,
    ) {
        // SAFETY: `u` has `R` rows of `r ≥ N` (caller).
        let b: [[__m512; N]; R] = std::array::from_fn(|q| {
            std::array::from_fn(|j| _mm512_set1_ps(s * unsafe { *u.add(q * r + j) }))
        });
        let mut c = 0;
        while c < n {
            let mask = lanes(n - c);
            // SAFETY: the masked lanes are within each row (caller).
            unsafe {
                let mut ys: [__m512; R] =
                    std::array::from_fn(|q| _mm512_maskz_loadu_ps(mask, y.add(q * n + c)));
                for j in 0..N {
                    let zv = _mm512_maskz_loadu_ps(mask, z.add(j * n + c));
                    for q in 0..R {
                        ys[q] = _mm512_fmadd_ps(b[q][j], zv, ys[q]);
                    }
                }
                for (q, v) in ys.iter().enumerate() {
                    _mm512_mask_storeu_ps(y.add(q * n + c), mask, *v);
                }
            }
            c += 16;
        }
    }

    /// [`super::t_times`] for the `cols ≤ 32` columns starting at `x[0]`
    /// (rows of stride `n`), into `out` (`r` rows of `cols`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `g` holds `m` rows of `r`, `x` holds
    /// `(m - 1) · n + cols` values, `out` `r · cols`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn t_times(
        g: &[f32],
        r: usize,
        x: &[f32],
        n: usize,
        m: usize,
        cols: usize,
        s: f32,
        out: &mut [f32],
    ) {
        debug_assert!(g.len() >= m * r && out.len() >= r * cols);
        debug_assert!(m == 0 || x.len() >= (m - 1) * n + cols);
        for j in (0..r).step_by(8) {
            let rows = (r - j).min(8);
            // SAFETY: as the caller promises, with `j + rows ≤ r`.
            unsafe {
                let (g, x) = (g.as_ptr().add(j), x.as_ptr());
                let out = out.as_mut_ptr().add(j * cols);
                dispatch!(gather, 1, rows, (g, r, x, [n, m, cols], s, out));
            }
        }
    }

    /// Rows of `x` fetched ahead in [`gather`].
    const AHEAD: usize = 32;

    /// `out_j = s · Σ_i g[i·r + j] x_i` for `N` values `j`, over `m` rows
    /// `x_i` (stride `n`) of `cols ≤ 32`, `i` in order.
    #[target_feature(enable = "avx512f")]
    unsafe fn gather<const R: usize, const N: usize>(
        g: *const f32,
        r: usize,
        x: *const f32,
        [n, m, cols]: [usize; 3],
        s: f32,
        out: *mut f32,
    ) {
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for i in 0..m {
            // SAFETY: row `i` of `x` has `cols` values from its start, and
            // row `i` of `g` `N` values (caller).
            unsafe {
                let row = x.add(i * n);
                // Rows lie `n` apart: fetch a few ahead (the hardware
                // prefetchers do not follow this stride far).
                if i + AHEAD < m {
                    let next = row.add(AHEAD * n) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(next);
                    _mm_prefetch::<_MM_HINT_T0>(next.add(64));
                }
                let v0 = _mm512_maskz_loadu_ps(m0, row);
                let v1 = _mm512_maskz_loadu_ps(m1, row.add(16));
                for (j, a) in acc.iter_mut().enumerate() {
                    let gb = _mm512_set1_ps(*g.add(i * r + j));
                    a[0] = _mm512_fmadd_ps(gb, v0, a[0]);
                    a[1] = _mm512_fmadd_ps(gb, v1, a[1]);
                }
            }
        }
        let s = _mm512_set1_ps(s);
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: `out` has `N` rows of `cols` (caller).
            unsafe {
                let row = out.add(j * cols);
                _mm512_mask_storeu_ps(row, m0, _mm512_mul_ps(a[0], s));
                _mm512_mask_storeu_ps(row.add(16), m1, _mm512_mul_ps(a[1], s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: [{i}] {g} vs {w}"
            );
        }
    }

    /// Every shape of tail: odd rows, widths not a multiple of 16, `r`
    /// below, at and above 8; each product against the plain `gemm` one.
    #[test]
    fn thin_products_match_gemm_on_every_tail() {
        for (m, k, r, n) in [
            (1, 1, 1, 1),
            (7, 33, 3, 17),
            (64, 576, 8, 192),
            (65, 100, 13, 50),
            (33, 48, 16, 40),
            (5, 16, 9, 31),
        ] {
            let what = format!("m {m} k {k} r {r} n {n}");
            let (x, a) = (values(m * k, 1), values(r * k, 2));
            let mut got = vec![f32::NAN; m * r];
            times_t(&x, [m, k, r], &a, &mut got);
            let mut want = vec![0f32; m * r];
            let (xv, av) = (View::rows(&x, k), View::rows(&a, k).t());
            matmul(m, r, k, xv, av, Out::new(&mut want, r), false);
            close(&got, &want, &format!("x aᵀ, {what}"));

            let (u, z) = (values(m * r, 3), values(r * n, 4));
            let mut got = values(m * n, 5);
            let mut want = got.clone();
            add_times(&mut got, [m, r, n], &u, &z, 0.75);
            let dst = Out::new(&mut want, n).accumulate().scaled(0.75);
            matmul(m, n, r, View::rows(&u, r), View::rows(&z, n), dst, false);
            close(&got, &want, &format!("y += s u z, {what}"));

            let (g, x) = (values(m * r, 6), values(m * n, 7));
            let mut got = vec![f32::NAN; r * n];
            t_times(&g, [m, r, n], &x, 1.5, &mut got);
            let mut want = vec![0f32; r * n];
            let dst = Out::new(&mut want, n).scaled(1.5);
            matmul(
                r,
                n,
                m,
                View::rows(&g, r).t(),
                View::rows(&x, n),
                dst,
                false,
            );
            close(&got, &want, &format!("s gᵀ x, {what}"));
        }
    }

    /// The sums' order does not depend on the thread count.
    #[test]
    fn thin_products_are_the_same_on_one_thread() {
        let (m, k, r) = (200, 96, 8);
        let (x, a) = (values(m * k, 8), values(r * k, 9));
        let run = || {
            let mut u = vec![0f32; m * r];
            times_t(&x, [m, k, r], &a, &mut u);
            let mut y = values(m * k, 10);
            add_times(&mut y, [m, r, k], &u, &a, 2.0);
            let mut d = vec![0f32; r * k];
            t_times(&u, [m, r, k], &y, 0.5, &mut d);
            (u, y, d)
        };
        let many = run();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert!(many == one);
    }
}
