//! Intel AMX tiles: whether the CPU has them (per data type) and whether
//! Linux lets this process use them (the tile data state is handed out
//! only on request, `ARCH_REQ_XCOMP_PERM`, once per process).

use std::arch::x86_64::__cpuid_count;
use std::sync::OnceLock;

/// What the tiles multiply.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TileType {
    /// Signed and unsigned bytes into int32 (`tdpbssd`, `tdpbusd`).
    Int8,
    /// bf16 pairs into f32 (`tdpbf16ps`).
    Bf16,
}

/// Whether tiles of `kind` run here, with AVX-512 (F, BW, VL) beside them.
pub(crate) fn available(kind: TileType) -> bool {
    // CPUID leaf 7: EDX bit 24 AMX-TILE, 25 AMX-INT8, 22 AMX-BF16.
    let edx = __cpuid_count(7, 0).edx;
    let bit = match kind {
        TileType::Int8 => 25,
        TileType::Bf16 => 22,
    };
    edx & (1 << 24) != 0
        && edx & (1 << bit) != 0
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && granted()
}

/// Whether Linux granted this process the tile data state (asked once).
fn granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(request_tile_state)
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// `ldtilecfg`'s 64-byte palette-1 layout: per tile, its rows and bytes
/// per row.
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles `0..shapes.len()` of `(rows, bytes per row)` each.
    pub(crate) const fn new(shapes: &[(u8, u16)]) -> Self {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut i = 0;
        while i < shapes.len() {
            rows[i] = shapes[i].0;
            colsb[i] = shapes[i].1;
            i += 1;
        }
        Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb,
            rows,
        }
    }
}
