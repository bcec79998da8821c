//! Which library multiplies each f32 product: the `gemm` crate, or MKL
//! (`blas.rs`) where it is present and measures faster. The choice is made
//! per product shape, on the products themselves: the first calls of a
//! shape alternate between the two (in the order A B B A, so neither is
//! always timed at the same call site; calls made at once on several
//! threads, as a product's bands are, may take the same turn), each timed
//! per FLOP, and once each
//! has [`TRIALS`] timings the faster by its median takes every later call
//! of that shape in the process. So the choice is measured on this
//! machine, on the model's real shapes, in the step's own conditions
//! (caches, the other thread's work), never read off a CPU name.
//!
//! The two libraries round differently and timings differ from run to run,
//! so with MKL present two processes may choose differently for a shape
//! and part in the last bits (a resumed run against an uninterrupted one).
//! `SKILLET_GEMM=gemm` keeps every product on `gemm`, as without MKL;
//! `SKILLET_GEMM=mkl` puts every product MKL can take on it.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use crate::blas::{Opened, opened};

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

/// What `SKILLET_GEMM` asks for (unset or unknown: `Auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmMode {
    /// Measured per shape.
    Auto,
    /// `gemm` for every product.
    Gemm,
    /// MKL for every product it can take.
    Mkl,
}

pub(crate) fn mode() -> GemmMode {
    static MODE: OnceLock<GemmMode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("SKILLET_GEMM").as_deref() {
        Ok("gemm") => GemmMode::Gemm,
        Ok("mkl") => GemmMode::Mkl,
        _ => GemmMode::Auto,
    })
}

/// How an operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Stored {
    Rows,
    Transposed,
}

/// A product's shape as the choice sees it: each size rounded up to a
/// power of two (token counts vary from batch to batch, and are `m` in
/// some products and `k` in others), how each operand is stored, and the
/// threads it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    m: usize,
    n: usize,
    k: usize,
    a: Stored,
    b: Stored,
    threads: usize,
}

impl Shape {
    pub fn new((m, n, k): (usize, usize, usize), (a, b): (Stored, Stored), threads: usize) -> Self {
        Self {
            m: m.next_power_of_two(),
            n: n.next_power_of_two(),
            k: k.next_power_of_two(),
            a,
            b,
            threads,
        }
    }
}

/// One shape's choice: being measured, or made.
#[derive(Clone, Debug, Default)]
pub(crate) struct Trial {
    /// Seconds per FLOP so far, by library (`gemm`, MKL).
    times: [Vec<f64>; 2],
    chosen: Option<Library>,
}

impl Trial {
    /// The library for the next call: the chosen one, or while measuring
    /// A B B A B A A B …, by the number of timings taken.
    pub fn next(&self) -> Library {
        if let Some(l) = self.chosen {
            return l;
        }
        let taken = self.times[0].len() + self.times[1].len();
        if taken.div_ceil(2).is_multiple_of(2) {
            Library::Gemm
        } else {
            Library::Mkl
        }
    }

    /// Records a measured call; chooses once both libraries have
    /// [`TRIALS`] timings (`gemm` where the medians are equal).
    pub fn record(&mut self, library: Library, seconds_per_flop: f64) {
        if self.chosen.is_some() {
            return;
        }
        self.times[library as usize].push(seconds_per_flop);
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

fn table() -> &'static RwLock<HashMap<Shape, Trial>> {
    static TABLE: OnceLock<RwLock<HashMap<Shape, Trial>>> = OnceLock::new();
    TABLE.get_or_init(RwLock::default)
}

/// The library for one product of `flops` FLOPs that MKL (present) can
/// take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pick {
    pub library: Library,
    /// Whether the call is part of the shape's measuring, to be timed and
    /// [`record`]ed.
    pub timed: bool,
}

pub(crate) fn pick(shape: Shape, flops: usize) -> Pick {
    let fixed = |library| Pick {
        library,
        timed: false,
    };
    match mode() {
        GemmMode::Gemm => fixed(Library::Gemm),
        GemmMode::Mkl => fixed(Library::Mkl),
        GemmMode::Auto if flops < MIN_FLOPS => fixed(Library::Gemm),
        GemmMode::Auto => {
            let chosen = |t: &HashMap<Shape, Trial>| t.get(&shape).and_then(Trial::chosen);
            if let Some(l) = chosen(&table().read().unwrap_or_else(|e| e.into_inner())) {
                return fixed(l);
            }
            let mut t = table().write().unwrap_or_else(|e| e.into_inner());
            let trial = t.entry(shape).or_default();
            Pick {
                library: trial.next(),
                timed: trial.chosen().is_none(),
            }
        }
    }
}

/// Records a timed call of `flops` FLOPs chosen by [`pick`].
pub(crate) fn record(shape: Shape, library: Library, flops: usize, elapsed: Duration) {
    let mut t = table().write().unwrap_or_else(|e| e.into_inner());
    t.entry(shape)
        .or_default()
        .record(library, elapsed.as_secs_f64() / flops as f64);
}

/// Which libraries the f32 products have used in this process so far;
/// its `Display` says it in a line.
#[derive(Clone, Debug)]
pub struct GemmReport {
    /// What was found of MKL.
    pub(crate) mkl: Opened,
    /// `SKILLET_GEMM`'s setting.
    pub(crate) mode: GemmMode,
    /// Product shapes (sizes rounded up to powers of two) chosen for MKL,
    /// in `auto` mode. Products too small to choose for, and products
    /// whose strides MKL cannot take, always run on `gemm` and are not
    /// counted.
    pub(crate) shapes_mkl: usize,
    /// Shapes chosen for `gemm`, as above.
    pub(crate) shapes_gemm: usize,
    /// Shapes still being measured, as above.
    pub(crate) shapes_measuring: usize,
}

impl std::fmt::Display for GemmReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match &self.mkl {
            Opened::Absent => {
                return write!(f, "gemm (MKL not found; scripts/fetch-mkl.sh fetches it)");
            }
            Opened::Off => return write!(f, "gemm (MKL turned off: SKILLET_MKL is empty)"),
            Opened::Failed(p, why) => {
                return write!(f, "gemm (MKL at {} did not open: {why})", p.display());
            }
            Opened::Open(b) => b.path.display(),
        };
        match self.mode {
            GemmMode::Gemm => write!(f, "gemm, fixed by SKILLET_GEMM (MKL at {path} unused)"),
            GemmMode::Mkl => write!(f, "MKL ({path}), fixed by SKILLET_GEMM"),
            GemmMode::Auto => {
                write!(
                    f,
                    "measured per shape: MKL ({path}) on {} shapes, gemm on {}",
                    self.shapes_mkl, self.shapes_gemm
                )?;
                if self.shapes_measuring > 0 {
                    write!(f, ", {} still measured", self.shapes_measuring)?;
                }
                Ok(())
            }
        }
    }
}

/// What [`GemmReport`] says now.
pub fn gemm_report() -> GemmReport {
    let t = table().read().unwrap_or_else(|e| e.into_inner());
    let count = |c: Option<Library>| t.values().filter(|v| v.chosen() == c).count();
    GemmReport {
        mkl: opened().clone(),
        mode: mode(),
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
        // A B B A B A A B …
        let mut order = Vec::new();
        // gemm at 1.0 with one outlier of 5.0; MKL at 0.9 with one of 3.0.
        for i in 0..2 * TRIALS {
            let l = t.next();
            order.push(l);
            assert_eq!(t.chosen(), None);
            let slow = i == 2 || i == 3;
            t.record(
                l,
                match (l, slow) {
                    (Library::Gemm, false) => 1.0,
                    (Library::Gemm, true) => 5.0,
                    (Library::Mkl, false) => 0.9,
                    (Library::Mkl, true) => 3.0,
                },
            );
        }
        use Library::{Gemm as G, Mkl as M};
        assert_eq!(order, [G, M, M, G, G, M, M, G, G, M][..2 * TRIALS]);
        assert_eq!(t.chosen(), Some(Library::Mkl));
        // Later timings change nothing.
        t.record(Library::Gemm, 0.01);
        assert_eq!(t.next(), Library::Mkl);

        let mut t = Trial::default();
        for _ in 0..2 * TRIALS {
            let l = t.next();
            t.record(l, if l == Library::Gemm { 1.0 } else { 1.5 });
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
    fn shapes_share_a_choice_across_sizes_up_to_a_power_of_two() {
        use Stored::{Rows, Transposed};
        let s = |m, k| Shape::new((m, 576, k), (Rows, Transposed), 2);
        assert_eq!(s(300, 1536), s(512, 1100));
        assert_ne!(s(512, 1536), s(513, 1536));
        assert_ne!(s(512, 1536), s(512, 2049));
        assert_ne!(s(512, 1536), Shape::new((512, 576, 1536), (Rows, Rows), 2));
        assert_ne!(
            s(512, 1536),
            Shape::new((512, 576, 1536), (Rows, Transposed), 1)
        );
    }

    #[test]
    fn picks_measure_a_shape_then_keep_its_choice() {
        if mode() != GemmMode::Auto {
            eprintln!("SKILLET_GEMM fixes the library: no choice to check");
            return;
        }
        // A shape no other test or kernel uses.
        let shape = Shape::new((3, 5, 7), (Stored::Transposed, Stored::Transposed), 99);
        let flops = MIN_FLOPS;
        let small = pick(shape, flops - 1);
        assert_eq!(
            small,
            Pick {
                library: Library::Gemm,
                timed: false
            }
        );
        for _ in 0..2 * TRIALS {
            let p = pick(shape, flops);
            assert!(p.timed);
            // MKL takes half the time per FLOP.
            let ms = if p.library == Library::Mkl { 1 } else { 2 };
            record(shape, p.library, flops, Duration::from_millis(ms));
        }
        let p = pick(shape, flops);
        assert_eq!(
            p,
            Pick {
                library: Library::Mkl,
                timed: false
            }
        );
    }

    #[test]
    fn the_report_names_what_ran() {
        let r = GemmReport {
            mkl: Opened::Absent,
            mode: GemmMode::Auto,
            shapes_mkl: 0,
            shapes_gemm: 0,
            shapes_measuring: 0,
        };
        assert!(r.to_string().starts_with("gemm (MKL not found"));
        let failed = GemmReport {
            mkl: Opened::Failed(
                "/x/libmkl_rt.so.3".into(),
                "no libmkl_core.so.3 beside it".into(),
            ),
            ..r.clone()
        };
        assert_eq!(
            failed.to_string(),
            "gemm (MKL at /x/libmkl_rt.so.3 did not open: no libmkl_core.so.3 beside it)"
        );
        let off = GemmReport {
            mkl: Opened::Off,
            ..r
        };
        assert!(off.to_string().contains("turned off"));
    }
}
