//! A bounds-checked front to the `gemm` crate (the GEMM candle itself uses;
//! with the workspace's `x86-v4` feature it picks AVX-512 kernels at run
//! time). Matrices are views into slices with arbitrary row and column
//! strides, so transposes and head-interleaved layouts cost no copy.

use gemm::Parallelism;

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
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every index the product touches was bounds-checked above
    // against the slices, which outlive the call; `out` is borrowed
    // mutably, so no input aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.data.as_mut_ptr(),
            1,
            out.rs as isize,
            out.accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            out.beta,
            false,
            false,
            false,
            parallelism,
        );
    }
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
}
