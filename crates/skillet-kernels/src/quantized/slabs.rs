//! f32 products over a quantized weight without a dense copy of it: the
//! output's columns are dealt to the threads in bands; for its band a
//! thread dequantizes the weights a slab at a time into its own reused
//! buffer and multiplies that slab at once, while it is in cache, with
//! the f32 GEMM on that thread alone. So beside its operands a product
//! needs one slab per thread (1 MiB, kept by the thread for the next
//! product), where a whole LM head dequantized was 113 MB for SmolLM2 and
//! 1 GB for Llama 3.2 1B's shape, and each weight goes from its blocks to
//! the GEMM's packing without a round trip through memory. The bands, and
//! so the order of the sums, follow the thread count; as with any GEMM,
//! a row's rounding may depend on the other rows of its call (training
//! products, not decoding's, come here). With MKL present, each slab's
//! product runs on the library chosen for its shape (`gemm_choice.rs`),
//! which rounds differently; `SKILLET_GEMM=gemm` keeps them all on `gemm`.

use std::cell::Cell;
use std::ops::Range;

use super::{BLOCK, QuantMatrix};
use crate::gemm::{Band, View, par_column_bands};
use crate::reused::hand_back;
use crate::vec::multiversion;

/// Weights per slab: 1 MiB of f32, about one core's share of cache.
pub(super) const SLAB: usize = 1 << 18;

thread_local! {
    /// Each thread's slab.
    static SLABS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `out = x Wᵀ` (`transposed`; `x`: `[t, cols]`, `out`: `[t, rows]`) or
/// `out = x W` (`x`: `[t, rows]`, `out`: `[t, cols]`), each slab at most
/// `slab` weights (at least one block row of a band).
pub(super) fn product(w: &QuantMatrix, x: &[f32], transposed: bool, out: &mut [f32], slab: usize) {
    let (k, n) = if transposed {
        (w.cols, w.rows)
    } else {
        (w.rows, w.cols)
    };
    let t = x.len() / k.max(1);
    assert_eq!(x.len(), t * k, "quantized product: input size");
    assert_eq!(out.len(), t * n, "quantized product: output size");
    if t == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let width = band_width(n, rayon::current_num_threads());
    // The slab's depth: whole blocks when it runs along a weight row.
    let step = if transposed { BLOCK } else { 1 };
    let depth = (slab / width).max(step) / step * step;
    par_column_bands(out, n, width, |band| {
        let mut buf = SLABS.take();
        for (i, from) in (0..k).step_by(depth).enumerate() {
            let to = (from + depth).min(k);
            multiply_slab(w, x, (k, transposed), from..to, band, i > 0, &mut buf);
        }
        hand_back(&SLABS, buf);
    });
}

/// Band widths: a multiple of a block, at most 512 columns (wide enough
/// that the GEMM's packing of `x` is repaid), aiming at a multiple of
/// `threads` bands (fewer where rounding up to a block leaves fewer).
fn band_width(n: usize, threads: usize) -> usize {
    let bands = threads.max(1) * n.div_ceil(512 * threads.max(1)).max(1);
    n.div_ceil(bands).div_ceil(BLOCK) * BLOCK
}

/// `band (+)= x[:, depth] · B[depth, band]`, where `B` is `Wᵀ` or `W`,
/// through the weights of that rectangle dequantized into `buf`.
fn multiply_slab(
    w: &QuantMatrix,
    x: &[f32],
    (k, transposed): (usize, bool),
    depth: Range<usize>,
    band: &mut Band,
    accumulate: bool,
    buf: &mut Vec<f32>,
) {
    let (d, cols) = (depth.len(), band.cols());
    buf.resize(d * cols.len(), 0.0);
    let a = View::rows(&x[depth.start..], k);
    if transposed {
        // B[depth, band] = W[band, depth]ᵀ: weight rows `band`, blocks `depth`.
        let blocks = depth.start / BLOCK..depth.end.div_ceil(BLOCK);
        dequantize_rect(w, cols.clone(), blocks, buf);
        band.matmul(d, a, View::rows(buf, d).t(), accumulate);
    } else {
        // B[depth, band] = W[depth, band]: weight rows `depth`, blocks `band`.
        let blocks = cols.start / BLOCK..cols.end.div_ceil(BLOCK);
        dequantize_rect(w, depth, blocks, buf);
        band.matmul(d, a, View::rows(buf, cols.len()), accumulate);
    }
}

multiversion! {
    /// Rows `rows` × blocks `blocks` of `w`, dense and row-major into `out`
    /// (`rows.len() × 32·blocks.len()`), with the bits of
    /// [`QuantMatrix::dequantize`].
    fn dequantize_rect(w: &QuantMatrix, rows: Range<usize>, blocks: Range<usize>, out: &mut [f32]) {
        let (nb, width) = (w.cols / BLOCK, blocks.len() * BLOCK);
        assert_eq!(out.len(), rows.len() * width, "dequantized slab size");
        for (o, dst) in rows.zip(out.chunks_exact_mut(width.max(1))) {
            for (b, values) in blocks.clone().zip(dst.chunks_exact_mut(BLOCK)) {
                let values: &mut [f32; BLOCK] = values.try_into().expect("a block");
                w.block(o * nb + b, values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{quant_matrices, random};

    /// `x Wᵀ` or `x W` in f64 over the dense weight.
    fn naive(dense: &[f32], (rows, cols): (usize, usize), x: &[f32], transposed: bool) -> Vec<f32> {
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let t = x.len() / k;
        let mut out = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                let b = |l: usize| {
                    if transposed {
                        dense[j * cols + l]
                    } else {
                        dense[l * cols + j]
                    }
                };
                let s: f64 = (0..k).map(|l| x[i * k + l] as f64 * b(l) as f64).sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    /// A random input for `x Wᵀ` (`transposed`) or `x W` with `t` rows,
    /// and its product over the dense weight in f64.
    fn input_and_product(
        dense: &[f32],
        (t, rows, cols): (usize, usize, usize),
        transposed: bool,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>) {
        let k = if transposed { cols } else { rows };
        let x = random(&[t, k], seed, 1.0).flatten_all().unwrap();
        let x = x.to_vec1::<f32>().unwrap();
        let want = naive(dense, (rows, cols), &x, transposed);
        (x, want)
    }

    /// The largest difference of the slab product from `want` (infinite
    /// where an element is NaN: left unwritten, or read before written).
    fn max_error(w: &QuantMatrix, x: &[f32], transposed: bool, slab: usize, want: &[f32]) -> f32 {
        let mut got = vec![f32::NAN; want.len()];
        product(w, x, transposed, &mut got, slab);
        let err = got.iter().zip(want).map(|(g, w)| (g - w).abs());
        err.fold(
            0f32,
            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
        )
    }

    #[test]
    fn slab_products_equal_the_dense_ones() {
        // Three threads, so that every shape but the smallest has several
        // bands whatever the machine.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(slab_products_on_this_pool);
    }

    /// Several bands and slabs per band, ragged last ones included (slabs
    /// of 1024 weights; of 4096, where 7 × 100 × 96 forward has bands of
    /// 64 rows and slabs of two blocks over three, and 20 × 600 × 64
    /// backward slabs of 128 rows over 600), and one slab each.
    fn slab_products_on_this_pool() {
        for (t, rows, cols) in [
            (7, 100, 96),
            (3, 37, 320),
            (1, 8, 32),
            (20, 600, 64),
            (5, 24, 256),
        ] {
            for w in quant_matrices(rows, cols) {
                let dense = w.dequantize();
                for transposed in [true, false] {
                    let (x, want) = input_and_product(&dense, (t, rows, cols), transposed, 5);
                    for slab in [BLOCK * 32, BLOCK * 128, SLAB] {
                        let err = max_error(&w, &x, transposed, slab, &want);
                        assert!(
                            err < 1e-4,
                            "{:?} {t}×{rows}×{cols} transposed {transposed} slab {slab}: {err}",
                            w.kind
                        );
                    }
                }
            }
        }
    }

    /// Slab products large enough for the library choice (`gemm_choice`):
    /// its first calls alternate between `gemm` and MKL where MKL is
    /// present (`scripts/fetch-mkl.sh`), so both libraries' bands are
    /// checked there, and MKL must have run; elsewhere every call is
    /// `gemm`'s.
    #[test]
    fn slab_products_on_either_library_equal_the_dense_ones() {
        use crate::gemm_choice::{GemmMode, mode};
        use std::sync::atomic::Ordering;
        // One thread: one band of at most 512 columns, so that each slab's
        // product (2²⁷ FLOPs) is well above the choice's floor.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let before = crate::gemm::MKL_CALLS.load(Ordering::Relaxed);
        pool.install(slab_products_on_either_library);
        let on_mkl = crate::gemm::MKL_CALLS.load(Ordering::Relaxed) - before;
        if crate::blas::blas().is_some() && mode() == GemmMode::Auto {
            // At least the measuring calls of each orientation's shape.
            assert!(
                on_mkl >= 2 * crate::gemm_choice::TRIALS,
                "{on_mkl} calls on MKL"
            );
        }
    }

    fn slab_products_on_either_library() {
        let (t, rows, cols) = (512, 512, 256);
        let w = quant_matrices(rows, cols).swap_remove(0);
        let dense = w.dequantize();
        for transposed in [true, false] {
            let (x, want) = input_and_product(&dense, (t, rows, cols), transposed, 6);
            for call in 0..2 * crate::gemm_choice::TRIALS + 2 {
                let err = max_error(&w, &x, transposed, SLAB, &want);
                assert!(err < 1e-3, "transposed {transposed}, call {call}: {err}");
            }
        }
    }

    #[test]
    fn slabs_have_the_dequantized_bits() {
        for w in quant_matrices(9, 128) {
            let dense = w.dequantize();
            let mut got = vec![0f32; 4 * 64];
            dequantize_rect(&w, 3..7, 1..3, &mut got);
            for (r, row) in got.chunks_exact(64).enumerate() {
                assert_eq!(row, &dense[(3 + r) * 128 + 32..(3 + r) * 128 + 96]);
            }
        }
    }

    #[test]
    fn bands_are_whole_blocks_of_at_most_512_columns() {
        for (n, threads, bands) in [
            (576, 2, 2),
            (192, 2, 2),
            (49152, 2, 96),
            (32, 4, 1),
            (2048, 16, 16),
            (100, 1, 1),
            (40, 4, 2),
        ] {
            let width = band_width(n, threads);
            assert_eq!(width % BLOCK, 0, "{n} {threads}");
            assert!(width <= 512, "{n} {threads}: {width}");
            assert_eq!(n.div_ceil(width), bands, "{n} {threads}");
        }
    }
}
