//! Intel's MKL, opened at run time where a copy is present
//! (`scripts/fetch-mkl.sh` puts one in the cache; `SKILLET_MKL` names
//! another): its sequential `cblas_sgemm`, with a parallel product dealt
//! over the rayon pool in bands of the output, one band per thread, and a
//! single-thread product (a band of QLoRA's slabs) one call. MKL's
//! own threads are never started, so nothing spins beside rayon's. Without
//! the library every product stays on the `gemm` crate; nothing links
//! against MKL at build time.

use std::ffi::{CString, c_int, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::gemm::{Out, Shared, View};

/// `cblas_sgemm`'s C signature.
pub(crate) type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The opened library: its `cblas_sgemm` and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct Blas {
    pub sgemm: Sgemm,
    pub path: PathBuf,
}

/// What was found of MKL.
#[derive(Clone, Debug)]
pub(crate) enum Opened {
    /// No copy where one is looked for.
    Absent,
    /// `SKILLET_MKL` set empty.
    Off,
    /// A copy that could not be used, and why.
    Failed(PathBuf, String),
    Open(Blas),
}

/// MKL, opened on first use (or why not).
pub(crate) fn opened() -> &'static Opened {
    static LIB: OnceLock<Opened> = OnceLock::new();
    LIB.get_or_init(|| match library_path() {
        Lookup::Off => Opened::Off,
        Lookup::None => Opened::Absent,
        Lookup::At(p) => match open(&p) {
            Ok(b) => Opened::Open(b),
            Err(why) => Opened::Failed(p, why),
        },
    })
}

/// The library where it opened; `None` runs everything on `gemm`.
pub(crate) fn blas() -> Option<&'static Blas> {
    match opened() {
        Opened::Open(b) => Some(b),
        _ => None,
    }
}

enum Lookup {
    Off,
    None,
    At(PathBuf),
}

/// `SKILLET_MKL` (the path of `libmkl_rt.so.3`; empty: none), else the
/// cache's copy ([`crate::cache_dir`]`/mkl/lib/libmkl_rt.so.3`) if
/// `scripts/fetch-mkl.sh` completed it.
fn library_path() -> Lookup {
    if let Some(p) = std::env::var_os("SKILLET_MKL") {
        return if p.is_empty() {
            Lookup::Off
        } else {
            Lookup::At(PathBuf::from(p))
        };
    }
    let Some(dir) = crate::cache_dir().map(|c| c.join("mkl/lib")) else {
        return Lookup::None;
    };
    if dir.join(".complete").is_file() {
        Lookup::At(dir.join("libmkl_rt.so.3"))
    } else {
        Lookup::None
    }
}

/// The libraries `libmkl_rt` loads on the sequential LP64 path, which must
/// sit beside it (MKL ends the process at the first call where one is
/// missing, rather than failing the open).
const BESIDE: [&str; 4] = [
    "libmkl_core.so.3",
    "libmkl_intel_lp64.so.3",
    "libmkl_sequential.so.3",
    "libmkl_def.so.3",
];

#[cfg(target_os = "linux")]
fn open(path: &std::path::Path) -> Result<Blas, String> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    if let Some(missing) = BESIDE.iter().find(|f| !dir.join(f).is_file()) {
        return Err(format!("no {missing} beside it"));
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let error = || {
        // SAFETY: dlerror returns null or a NUL-terminated message.
        let e = unsafe { libc::dlerror() };
        if e.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: as above; copied before any other dl call.
            unsafe { std::ffi::CStr::from_ptr(e) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: a NUL-terminated path; the handle is never closed, so the
    // symbols below stay valid for the process's life.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(error());
    }
    let sym = |name: &str| -> Result<*mut c_void, String> {
        let n = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: a valid handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(h, n.as_ptr()) };
        if p.is_null() { Err(error()) } else { Ok(p) }
    };
    type SetLayer = unsafe extern "C" fn(c_int) -> c_int;
    // SAFETY: MKL's documented signatures for these three symbols.
    unsafe {
        let interface: SetLayer = std::mem::transmute(sym("MKL_Set_Interface_Layer")?);
        let threading: SetLayer = std::mem::transmute(sym("MKL_Set_Threading_Layer")?);
        let sgemm: Sgemm = std::mem::transmute(sym("cblas_sgemm")?);
        // 32-bit integers (LP64) and the sequential layer, before any other
        // call into the library; each call returns the layer then in force.
        if interface(0) != 0 || threading(1) != 1 {
            return Err("it was already set up with another interface or threading".into());
        }
        Ok(Blas {
            sgemm,
            path: path.to_path_buf(),
        })
    }
}

#[cfg(not(target_os = "linux"))]
fn open(_: &std::path::Path) -> Result<Blas, String> {
    Err("MKL is opened on Linux only".into())
}

/// A `rows × cols` view as a row-major CBLAS operand: (transpose flag,
/// leading dimension), or `None` where neither stride is 1 or a dimension
/// does not fit CBLAS's `int`.
fn operand(rows: usize, cols: usize, v: View) -> Option<(c_int, c_int)> {
    let fits = |x: usize| c_int::try_from(x).ok();
    fits(rows)?;
    fits(cols)?;
    if v.cs == 1 || cols == 1 {
        // Row i starts at i·ld; a single row may have any row stride.
        let ld = if rows == 1 { cols } else { v.rs };
        if ld >= cols.max(1) {
            return Some((NO_TRANS, fits(ld)?));
        }
    }
    if v.rs == 1 || rows == 1 {
        // Stored transposed: column j starts at j·cs.
        let ld = if cols == 1 { rows } else { v.cs };
        if ld >= rows.max(1) {
            return Some((TRANS, fits(ld)?));
        }
    }
    None
}

/// Whether `sgemm` can take `a[m×k]·b[k×n]` into rows of stride `rs`.
pub(crate) fn supports(m: usize, n: usize, k: usize, a: View, b: View, rs: usize) -> bool {
    operand(m, k, a).is_some()
        && operand(k, n, b).is_some()
        && c_int::try_from(rs).is_ok()
        && rs >= n
}

/// `out (+)= beta · a·b` by `sgemm`, in bands over `threads` rayon threads
/// (one band, on the calling thread, when `threads` is 1). The caller has
/// checked bounds and [`supports`].
pub(crate) fn matmul(
    sgemm: Sgemm,
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    out: Out,
    threads: usize,
) {
    let dst = Shared(out.data.as_mut_ptr());
    let accumulate = (out.accumulate, out.beta);
    let rs = out.rs;
    let band = move |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        // The band's operands: rows of `a`, columns of `b`.
        let a = View {
            data: &a.data[rows.start * a.rs..],
            ..a
        };
        let b = View {
            data: &b.data[cols.start * b.cs..],
            ..b
        };
        // SAFETY: the views were bounds-checked for the whole product, of
        // which this band's operands are sub-blocks (so `supports` holds
        // for them too: their strides are the whole's, their sides no
        // longer); each band writes its own rows × cols of `dst` alone.
        unsafe {
            product_raw(
                sgemm,
                (rows.len(), cols.len(), k),
                a,
                b,
                dst.get().add(rows.start * rs + cols.start),
                rs,
                accumulate,
            );
        }
    };
    if threads <= 1 {
        band(0..m, 0..n);
    } else if n >= m {
        // Bands of columns: each thread reads its own part of `b`.
        let width = n.div_ceil(threads).div_ceil(16) * 16;
        rayon::scope(|s| {
            for t in 1..threads {
                let cols = (t * width).min(n)..((t + 1) * width).min(n);
                s.spawn(move |_| band(0..m, cols));
            }
            band(0..m, 0..width.min(n));
        });
    } else {
        let height = m.div_ceil(threads).div_ceil(8) * 8;
        rayon::scope(|s| {
            for t in 1..threads {
                let rows = (t * height).min(m)..((t + 1) * height).min(m);
                s.spawn(move |_| band(rows, 0..n));
            }
            band(0..height.min(m), 0..n);
        });
    }
}

/// `dst (+)= beta · a·b` by one `sgemm` call on the calling thread, `dst`
/// row-major with row stride `rs`.
///
/// # Safety
/// `a`, `b` and `m × n` elements of `dst` at stride `rs` must be in
/// bounds, [`supports`] must hold, and nothing else may read or write
/// those elements of `dst` during the call.
pub(crate) unsafe fn product_raw(
    sgemm: Sgemm,
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    dst: *mut f32,
    rs: usize,
    (accumulate, beta): (bool, f32),
) {
    let (ta, lda) = operand(m, k, a).expect("checked by supports");
    let (tb, ldb) = operand(k, n, b).expect("checked by supports");
    // SAFETY: the caller's contract; CBLAS's `alpha` scales the product,
    // its `beta` what was there.
    unsafe {
        sgemm(
            ROW_MAJOR,
            ta,
            tb,
            m as c_int,
            n as c_int,
            k as c_int,
            beta,
            a.data.as_ptr(),
            lda,
            b.data.as_ptr(),
            ldb,
            if accumulate { 1.0 } else { 0.0 },
            dst,
            rs as c_int,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::gemm::gemm_product;

    /// Set by [`naive_sgemm`] when handed leading dimensions CBLAS refuses
    /// (a panic cannot cross its C ABI).
    static REFUSED: AtomicBool = AtomicBool::new(false);

    /// CBLAS's row-major `sgemm`, naively, to check the operands and bands
    /// handed to it without the library.
    unsafe extern "C" fn naive_sgemm(
        layout: c_int,
        ta: c_int,
        tb: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    ) {
        let (m, n, k) = (m as usize, n as usize, k as usize);
        let (lda, ldb, ldc) = (lda as usize, ldb as usize, ldc as usize);
        if layout != ROW_MAJOR
            || lda < if ta == NO_TRANS { k } else { m }.max(1)
            || ldb < if tb == NO_TRANS { n } else { k }.max(1)
            || ldc < n.max(1)
        {
            REFUSED.store(true, Ordering::Relaxed);
            return;
        }
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    // SAFETY: CBLAS's contract on the leading dimensions.
                    let (x, y) = unsafe {
                        (
                            *a.add(if ta == NO_TRANS {
                                i * lda + l
                            } else {
                                l * lda + i
                            }),
                            *b.add(if tb == NO_TRANS {
                                l * ldb + j
                            } else {
                                j * ldb + l
                            }),
                        )
                    };
                    s += x * y;
                }
                // SAFETY: as above.
                unsafe {
                    let d = c.add(i * ldc + j);
                    *d = alpha * s + if beta == 0.0 { 0.0 } else { beta * *d };
                }
            }
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 23) as f32 * 0.125 - 1.4)
            .collect()
    }

    /// `a` (`m × k`) and `b` (`k × n`) each stored row-major or
    /// transposed, with rows padded to `pad` extra elements.
    fn operands(
        (m, n, k): (usize, usize, usize),
        (at, bt): (bool, bool),
        pad: usize,
    ) -> (Vec<f32>, usize, Vec<f32>, usize) {
        let (ar, ac) = if at { (k, m) } else { (m, k) };
        let (br, bc) = if bt { (n, k) } else { (k, n) };
        (
            values(ar * (ac + pad), 1),
            ac + pad,
            values(br * (bc + pad), 2),
            bc + pad,
        )
    }

    /// Equal within `tol`, or both NaN (the padding a product leaves alone).
    fn same(got: &[f32], want: &[f32], tol: f32) -> bool {
        got.iter()
            .zip(want)
            .all(|(g, w)| (g.is_nan() && w.is_nan()) || (g - w).abs() < tol)
    }

    fn view(data: &[f32], ld: usize, transposed: bool) -> View<'_> {
        let v = View::rows(data, ld);
        if transposed { v.t() } else { v }
    }

    #[test]
    fn bands_of_any_layout_match_gemm() {
        let shapes = [
            (5, 9, 4),
            (9, 5, 7),
            (1, 6, 3),
            (6, 1, 3),
            (17, 40, 2),
            (33, 3, 5),
        ];
        for (m, n, k) in shapes {
            for at in [false, true] {
                for bt in [false, true] {
                    for pad in [0, 3] {
                        for threads in [1, 2, 3] {
                            let (a, lda, b, ldb) = operands((m, n, k), (at, bt), pad);
                            let (av, bv) = (view(&a, lda, at), view(&b, ldb, bt));
                            let rs = n + pad;
                            assert!(supports(m, n, k, av, bv, rs));
                            // What is there is not read without `accumulate`.
                            let (mut want, mut got) =
                                (vec![f32::NAN; m * rs], vec![f32::NAN; m * rs]);
                            gemm_product((m, n, k), av, bv, Out::new(&mut want, rs), 1);
                            matmul(
                                naive_sgemm,
                                (m, n, k),
                                av,
                                bv,
                                Out::new(&mut got, rs),
                                threads,
                            );
                            let what =
                                format!("{m}×{n}×{k} at={at} bt={bt} pad={pad} threads={threads}");
                            assert!(same(&got, &want, 1e-4), "{what}");
                            // Accumulated and scaled.
                            let start = values(m * rs, 3);
                            let (mut want, mut got) = (start.clone(), start.clone());
                            gemm_product(
                                (m, n, k),
                                av,
                                bv,
                                Out::new(&mut want, rs).accumulate().scaled(-0.5),
                                1,
                            );
                            matmul(
                                naive_sgemm,
                                (m, n, k),
                                av,
                                bv,
                                Out::new(&mut got, rs).accumulate().scaled(-0.5),
                                threads,
                            );
                            assert!(same(&got, &want, 1e-4), "{what}, accumulated");
                            assert!(!REFUSED.load(Ordering::Relaxed), "{what}: refused operands");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn views_without_a_unit_stride_or_with_short_rows_are_refused() {
        let d = vec![0.0; 64];
        // Neither stride 1 (every other element of every other row).
        let strided = View {
            data: &d,
            rs: 8,
            cs: 2,
        };
        assert_eq!(operand(3, 3, strided), None);
        // Rows overlapping: a leading dimension below the row length.
        let overlapping = View {
            data: &d,
            rs: 2,
            cs: 1,
        };
        assert_eq!(operand(3, 4, overlapping), None);
        assert!(!supports(3, 4, 4, overlapping, View::rows(&d, 4), 4));
        // Output rows shorter than the product's.
        assert!(!supports(2, 4, 2, View::rows(&d, 2), View::rows(&d, 4), 3));
        // A single row takes any row stride, a single column any column stride.
        assert_eq!(
            operand(
                1,
                4,
                View {
                    data: &d,
                    rs: 0,
                    cs: 1
                }
            ),
            Some((NO_TRANS, 4))
        );
        assert_eq!(
            operand(
                4,
                1,
                View {
                    data: &d,
                    rs: 5,
                    cs: 9
                }
            ),
            Some((NO_TRANS, 5))
        );
        assert_eq!(operand(4, 3, View::rows(&d, 4).t()), Some((TRANS, 4)));
    }

    /// Where MKL is present (see `scripts/fetch-mkl.sh`), its products
    /// agree with `gemm`'s; where it is not, there is nothing to check.
    #[test]
    fn mkl_where_present_matches_gemm() {
        let Some(lib) = blas() else {
            eprintln!("MKL not present: nothing to compare");
            return;
        };
        for (m, n, k) in [(64, 96, 80), (200, 48, 300), (1, 130, 70), (33, 2, 1)] {
            for (at, bt) in [(false, true), (false, false), (true, false)] {
                let (a, lda, b, ldb) = operands((m, n, k), (at, bt), 1);
                let (av, bv) = (view(&a, lda, at), view(&b, ldb, bt));
                let rs = n + 2;
                let scale = (k as f32).sqrt() * 1e-5;
                let what = format!("{m}×{n}×{k} at={at} bt={bt}");
                let (mut want, mut got) = (vec![f32::NAN; m * rs], vec![f32::NAN; m * rs]);
                gemm_product((m, n, k), av, bv, Out::new(&mut want, rs), 1);
                matmul(lib.sgemm, (m, n, k), av, bv, Out::new(&mut got, rs), 2);
                assert!(same(&got, &want, scale), "{what}");
                let start = values(m * rs, 4);
                let (mut want, mut got) = (start.clone(), start);
                let out = |d| Out::new(d, rs).accumulate().scaled(0.25);
                gemm_product((m, n, k), av, bv, out(&mut want), 1);
                matmul(lib.sgemm, (m, n, k), av, bv, out(&mut got), 2);
                assert!(same(&got, &want, scale), "{what}, accumulated");
            }
        }
    }
}
