//! Whether the CPU has AVX512-VNNI (`vpdpbusd`: 64 byte products summed
//! by fours into 16 int32 lanes per instruction), which the int8 products
//! of `striped.rs` run on.

/// Whether the CPU has the instructions.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}
