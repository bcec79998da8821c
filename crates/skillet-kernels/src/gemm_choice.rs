//! Which library multiplies each f32 product: the `gemm` crate, or MKL
//! (`blas.rs`) where it is present and measures faster. The choice is made
//! per product shape, on the products themselves: the first calls of a
//! shape alternate between the two, each timed, and once each has
//! [`TRIALS`] timings the faster by its median takes every later call of
//! that shape in the process. So the choice is measured on this machine,
//! on the model's real shapes, in the step's own conditions (caches, the
//! other thread's work), never read off a CPU name.
//!
//! `SKILLET_GEMM=gemm` or `=mkl` fixes the library (where MKL is absent,
//! `mkl` runs `gemm`), for runs that must repeat bit for bit across
//! processes: the two round differently, and timings differ run to run.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;

use crate::blas::blas;

/// Timed calls per library before a shape's choice is made.
pub(crate) const TRIALS: usize = 5;

/// Products below this many FLOPs (`2·m·n·k`) always run on `gemm`: they
/// take under a millisecond, and choosing costs a lock and a clock read.
const MIN_FLOPS: usize = 1 << 25;

/// A library for one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Library {
    Gemm,
    Mkl,
}

/// What `SKILLET_GEMM` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Auto,
    Fixed(Library),
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("SKILLET_GEMM").as_deref() {
        Ok("gemm") => Mode::Fixed(Library::Gemm),
        Ok("mkl") => Mode::Fixed(Library::Mkl),
        _ => Mode::Auto,
    })
}

/// A product's shape as the choice sees it: the row count rounded up to a
/// power of two (sequence lengths vary from batch to batch), the other
/// sizes, whether each operand is stored transposed, and the threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    m: usize,
    n: usize,
    k: usize,
    a_transposed: bool,
    b_transposed: bool,
    threads: usize,
}

impl Shape {
    pub fn new(
        (m, n, k): (usize, usize, usize),
        (a_transposed, b_transposed): (bool, bool),
        threads: usize,
    ) -> Self {
        Self {
            m: m.next_power_of_two(),
            n,
            k,
            a_transposed,
            b_transposed,
            threads,
        }
    }
}

/// One shape's choice: being measured, or made.
#[derive(Clone, Debug, Default)]
pub(crate) struct Trial {
    /// Seconds per call so far, by library (`gemm`, MKL).
    times: [Vec<f64>; 2],
    chosen: Option<Library>,
}

impl Trial {
    /// The library for the next call: the chosen one, or while measuring
    /// the one with fewer timings (`gemm` first).
    pub fn next(&self) -> Library {
        match self.chosen {
            Some(l) => l,
            None if self.times[1].len() < self.times[0].len() => Library::Mkl,
            None => Library::Gemm,
        }
    }

    /// Records a measured call; chooses once both libraries have
    /// [`TRIALS`] timings.
    pub fn record(&mut self, library: Library, seconds: f64) {
        if self.chosen.is_some() {
            return;
        }
        self.times[library as usize].push(seconds);
        if self.times.iter().all(|t| t.len() >= TRIALS) {
            let [g, m] = self.times.clone().map(median);
            self.chosen = Some(if m < g { Library::Mkl } else { Library::Gemm });
        }
    }

    pub fn chosen(&self) -> Option<Library> {
        self.chosen
    }
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn table() -> &'static Mutex<HashMap<Shape, Trial>> {
    static TABLE: OnceLock<Mutex<HashMap<Shape, Trial>>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

/// The library for one product of `flops` FLOPs that MKL (present) can
/// take, and whether the call is to be timed and [`record`]ed.
pub(crate) fn pick(shape: Shape, flops: usize) -> (Library, bool) {
    match mode() {
        Mode::Fixed(l) => (l, false),
        Mode::Auto if flops < MIN_FLOPS => (Library::Gemm, false),
        Mode::Auto => {
            let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
            let trial = t.entry(shape).or_default();
            (trial.next(), trial.chosen().is_none())
        }
    }
}

/// Records a timed call chosen by [`pick`].
pub(crate) fn record(shape: Shape, library: Library, elapsed: Duration) {
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    t.entry(shape)
        .or_default()
        .record(library, elapsed.as_secs_f64());
}

/// Which libraries the f32 products have used in this process so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GemmReport {
    /// MKL's path where it was found and opened.
    pub mkl: Option<std::path::PathBuf>,
    /// `SKILLET_GEMM`'s setting: `auto`, `gemm` or `mkl`.
    pub mode: &'static str,
    /// Product shapes chosen for MKL, for `gemm`, and still being measured
    /// (in `auto` mode; products too small to choose for are not counted).
    pub shapes_mkl: usize,
    pub shapes_gemm: usize,
    pub shapes_measuring: usize,
}

impl std::fmt::Display for GemmReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.mkl, self.mode) {
            (None, _) => write!(f, "gemm (MKL not found; scripts/fetch-mkl.sh fetches it)"),
            (Some(p), "auto") => write!(
                f,
                "measured per shape: MKL ({}) on {} shapes, gemm on {}{}",
                p.display(),
                self.shapes_mkl,
                self.shapes_gemm,
                if self.shapes_measuring > 0 {
                    format!(", {} still measured", self.shapes_measuring)
                } else {
                    String::new()
                }
            ),
            (Some(p), "mkl") => write!(f, "MKL ({}), fixed by SKILLET_GEMM", p.display()),
            (Some(_), _) => write!(f, "gemm, fixed by SKILLET_GEMM"),
        }
    }
}

/// What [`GemmReport`] says now.
pub fn gemm_report() -> GemmReport {
    let mkl = blas().map(|b| b.path.clone());
    let mode = match mode() {
        Mode::Auto => "auto",
        Mode::Fixed(Library::Gemm) => "gemm",
        Mode::Fixed(Library::Mkl) => "mkl",
    };
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let count = |c: Option<Library>| t.values().filter(|v| v.chosen() == c).count();
    GemmReport {
        mkl,
        mode,
        shapes_mkl: count(Some(Library::Mkl)),
        shapes_gemm: count(Some(Library::Gemm)),
        shapes_measuring: count(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_alternates_then_keeps_the_faster_by_its_median() {
        let mut t = Trial::default();
        // gemm: 1.0, 5.0 (an outlier), 1.1; MKL: 0.9, 0.95, 3.0.
        let times = [(1.0, 0.9), (5.0, 0.95), (1.1, 3.0)];
        for (g, m) in times {
            assert_eq!(t.next(), Library::Gemm);
            t.record(Library::Gemm, g);
            assert_eq!(t.chosen(), None);
            assert_eq!(t.next(), Library::Mkl);
            t.record(Library::Mkl, m);
        }
        assert_eq!(t.chosen(), Some(Library::Mkl));
        // Later timings change nothing.
        t.record(Library::Gemm, 0.01);
        assert_eq!(t.next(), Library::Mkl);

        let mut t = Trial::default();
        for _ in 0..TRIALS {
            t.record(t.next(), 1.0);
            t.record(t.next(), 1.5);
        }
        assert_eq!(t.chosen(), Some(Library::Gemm));
        // Equal medians keep `gemm`.
        let mut t = Trial::default();
        for _ in 0..2 * TRIALS {
            t.record(t.next(), 1.0);
        }
        assert_eq!(t.chosen(), Some(Library::Gemm));
    }

    #[test]
    fn shapes_share_a_choice_across_row_counts_up_to_a_power_of_two() {
        let s = |m| Shape::new((m, 576, 1536), (false, true), 2);
        assert_eq!(s(300), s(512));
        assert_ne!(s(512), s(513));
        assert_ne!(s(512), Shape::new((512, 576, 1536), (false, false), 2));
        assert_ne!(s(512), Shape::new((512, 576, 1536), (false, true), 1));
    }

    #[test]
    fn the_report_names_what_ran() {
        let r = GemmReport {
            mkl: None,
            mode: "auto",
            shapes_mkl: 0,
            shapes_gemm: 0,
            shapes_measuring: 0,
        };
        assert!(r.to_string().starts_with("gemm (MKL not found"));
        let r = GemmReport {
            mkl: Some("/x/libmkl_rt.so.3".into()),
            shapes_mkl: 5,
            shapes_gemm: 2,
            shapes_measuring: 1,
            ..r
        };
        assert_eq!(
            r.to_string(),
            "measured per shape: MKL (/x/libmkl_rt.so.3) on 5 shapes, gemm on 2, 1 still measured"
        );
    }
}
