//! A bounds-checked front to the `gemm` crate (the GEMM candle itself uses;
//! with the workspace's `x86-v4` feature it picks AVX-512 kernels at run
//! time), and to MKL where it is present and measures faster for a
//! product's shape (`blas.rs`, `gemm_choice.rs`). Matrices are views into
//! slices with arbitrary row and column strides, so transposes and
//! head-interleaved layouts cost no copy.

use std::time::Instant;

use gemm::Parallelism;

use crate::blas::{Sgemm, blas};
use crate::gemm_choice::{self, Library, Shape, Stored};

/// A read-only `rows × cols` matrix view: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major rows of width `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm view out of bounds");
        }
    }
}

/// The destination: row-major with row stride `rs`; `dst = beta · a·b`, or
/// `dst += beta · a·b` with `accumulate`.
pub(crate) struct Out<'a> {
    pub data: &'a mut [f32],
    pub rs: usize,
    pub accumulate: bool,
    pub beta: f32,
}

impl<'a> Out<'a> {
    /// `dst = a·b` into row-major rows of width `rs`.
    pub fn new(data: &'a mut [f32], rs: usize) -> Self {
        Self {
            data,
            rs,
            accumulate: false,
            beta: 1.0,
        }
    }

    /// Adds the product to what is there.
    pub fn accumulate(mut self) -> Self {
        self.accumulate = true;
        self
    }

    /// Scales the product by `beta`.
    pub fn scaled(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }
}

/// `out (+)= beta · a[m×k] · b[k×n]`, on the global thread pool when
/// `parallel` (callers already inside a parallel loop pass false).
pub(crate) fn matmul(m: usize, n: usize, k: usize, a: View, b: View, out: Out, parallel: bool) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k);
    b.check(k, n);
    assert!(
        (m - 1) * out.rs + n <= out.data.len(),
        "gemm output out of bounds"
    );
    if k == 0 {
        if !out.accumulate {
            for i in 0..m {
                out.data[i * out.rs..i * out.rs + n].fill(0.0);
            }
        }
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let rs = out.rs;
    on_chosen_library((m, n, k), a, b, rs, threads, |mkl| match mkl {
        Some(sgemm) => crate::blas::matmul(sgemm, (m, n, k), a, b, out, threads),
        None => gemm_product((m, n, k), a, b, out, threads),
    });
}

/// Products handed to MKL so far in this process, for tests to check that
/// a path reached it.
#[cfg(test)]
pub(crate) static MKL_CALLS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Runs `product` with MKL's `cblas_sgemm` or with `None` (the `gemm`
/// crate), as [`gemm_choice`] picks for this shape on `threads` threads
/// (always `None` where MKL is absent or cannot take the operands), and
/// times the call where the pick is being measured.
fn on_chosen_library(
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    rs: usize,
    threads: usize,
    product: impl FnOnce(Option<Sgemm>),
) {
    let Some(lib) = blas().filter(|_| crate::blas::supports(m, n, k, a, b, rs)) else {
        return product(None);
    };
    let stored = |v: View| {
        if v.cs == 1 {
            Stored::Rows
        } else {
            Stored::Transposed
        }
    };
    let shape = Shape::new((m, n, k), (stored(a), stored(b)), threads);
    let flops = 2 * m * n * k;
    let pick = gemm_choice::pick(shape, flops);
    // The clock is read only for the calls that measure.
    let start = pick.timed.then(Instant::now);
    #[cfg(test)]
    if pick.library == Library::Mkl {
        MKL_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    product(match pick.library {
        Library::Mkl => Some(lib.sgemm),
        Library::Gemm => None,
    });
    if let Some(start) = start {
        gemm_choice::record(shape, pick.library, flops, start.elapsed());
    }
}

/// `out (+)= beta · a·b` by the `gemm` crate, on `threads` threads of the
/// pool; bounds already checked.
pub(crate) fn gemm_product(
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    out: Out,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every index the product touches was bounds-checked by
    // `matmul` against the slices, which outlive the call; `out` is
    // borrowed mutably, so no input aliases it.
    unsafe {
        product_raw(
            (m, n, k),
            a,
            b,
            out.data.as_mut_ptr(),
            out.rs,
            (out.accumulate, out.beta),
            parallelism,
        )
    };
}

/// The `gemm` crate's call: `dst (+)= beta · a·b`, `dst` row-major with row
/// stride `rs`.
///
/// # Safety
/// `a`, `b` and `m × n` elements of `dst` at stride `rs` must be in
/// bounds, and nothing else may read or write those elements of `dst`
/// during the call.
unsafe fn product_raw(
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    dst: *mut f32,
    rs: usize,
    (accumulate, beta): (bool, f32),
    parallelism: Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A band of columns of a row-major output that one thread writes alone
/// (see [`par_column_bands`]).
pub(crate) struct Band<'a> {
    dst: *mut f32,
    len: usize,
    rows: usize,
    rs: usize,
    cols: std::ops::Range<usize>,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl Band<'_> {
    /// The band's columns (fixed: `matmul` writes these alone).
    pub fn cols(&self) -> std::ops::Range<usize> {
        self.cols.clone()
    }

    /// `band = a[rows × k] · b[k × width]`, or `band += …` with
    /// `accumulate`, on the calling thread, by the library chosen for its
    /// shape on one thread (`gemm_choice.rs`).
    pub fn matmul(&mut self, k: usize, a: View, b: View, accumulate: bool) {
        let (m, n) = (self.rows, self.cols.len());
        if m == 0 || n == 0 {
            return;
        }
        a.check(m, k);
        b.check(k, n);
        assert!(
            (m - 1) * self.rs + self.cols.end <= self.len,
            "gemm band out of bounds"
        );
        if k == 0 {
            assert!(
                accumulate,
                "gemm band: an empty product would leave it unwritten"
            );
            return;
        }
        let (dst, rs) = (Shared(self.dst), self.rs);
        let start = self.cols.start;
        on_chosen_library((m, n, k), a, b, rs, 1, |mkl| {
            // SAFETY: bounds checked above; the band's elements are written
            // by this call alone (`par_column_bands` deals each band to one
            // closure call, and the output stays borrowed meanwhile).
            unsafe {
                let dst = dst.get().add(start);
                match mkl {
                    Some(sgemm) => {
                        crate::blas::product_raw(sgemm, (m, n, k), a, b, dst, rs, (accumulate, 1.0))
                    }
                    None => product_raw(
                        (m, n, k),
                        a,
                        b,
                        dst,
                        rs,
                        (accumulate, 1.0),
                        Parallelism::None,
                    ),
                }
            }
        });
    }
}

/// The output's address, shared by the bands' threads (here and in
/// `blas.rs`).
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub *mut f32);
impl Shared {
    /// The address (a method, so closures take the whole `Shared`).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: each thread writes through it only its own band of the output.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// Calls `f` on each band of `width` columns (the last may be narrower) of
/// `out` (`rows × n`, row-major), the bands spread over the thread pool.
pub(crate) fn par_column_bands<'a>(
    out: &'a mut [f32],
    n: usize,
    width: usize,
    f: impl Fn(&mut Band<'a>) + Sync,
) {
    use rayon::prelude::*;
    if n == 0 {
        return;
    }
    assert!(width > 0, "gemm bands: zero width");
    let rows = out.len() / n;
    assert_eq!(rows * n, out.len(), "gemm bands: output size");
    let (len, dst) = (out.len(), Shared(out.as_mut_ptr()));
    (0..n.div_ceil(width)).into_par_iter().for_each(|i| {
        let mut band = Band {
            dst: dst.get(),
            len,
            rows,
            rs: n,
            cols: i * width..((i + 1) * width).min(n),
            _out: std::marker::PhantomData,
        };
        f(&mut band);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 1.5).collect();
        // b stored as [n, k]: use its transpose.
        let mut out = vec![1.0; m * n];
        matmul(
            m,
            n,
            k,
            View::rows(&a, k),
            View::rows(&b, k).t(),
            Out::new(&mut out, n).accumulate().scaled(2.0),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum();
                assert!((out[i * n + j] - (1.0 + 2.0 * dot)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn bands_write_their_columns_alone() {
        let (m, n, k) = (6, 23, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.25 - 0.5).collect();
        let mut want = vec![0.0; m * n];
        matmul(
            m,
            n,
            k,
            View::rows(&a, k),
            View::rows(&b, n),
            Out::new(&mut want, n),
            false,
        );
        // Each band is two products over halves of `k`, the second added.
        let mut got = vec![f32::NAN; m * n];
        par_column_bands(&mut got, n, 4, |band| {
            let c0 = band.cols().start;
            band.matmul(2, View::rows(&a, k), View::rows(&b[c0..], n), false);
            band.matmul(
                3,
                View::rows(&a[2..], k),
                View::rows(&b[2 * n + c0..], n),
                true,
            );
        });
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5));
    }
}
