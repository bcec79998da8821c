# The llama.cpp CPU options both reference builds use (sourced by
# setup-llama-server.sh and setup-llamacpp.sh): GGML_NATIVE=OFF with an
# explicit x86-64 instruction set, since GGML_NATIVE=ON picks instructions
# a VM's hypervisor may not pass through (the binary then dies with
# SIGILL). Each set is turned on only where /proc/cpuinfo lists it, so an
# AVX2-only CPU gets an AVX2 build. AVX-VNNI and AMX stay off, as in the
# builds the Xeon's tables were measured with.
_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
_has() { for f in "$@"; do [[ "$_flags" == *" $f "* ]] || return 1; done; }
_opt() { local name=$1; shift; if _has "$@"; then echo "-D$name=ON"; else echo "-D$name=OFF"; fi; }
CPU_FLAGS=(
  -DGGML_NATIVE=OFF
  "$(_opt GGML_SSE42 sse4_2)" "$(_opt GGML_AVX avx)" "$(_opt GGML_AVX2 avx2)" "$(_opt GGML_BMI2 bmi2)"
  "$(_opt GGML_FMA fma)" "$(_opt GGML_F16C f16c)"
  "$(_opt GGML_AVX512 avx512f avx512cd avx512vl avx512dq avx512bw)" "$(_opt GGML_AVX512_VBMI avx512vbmi)"
  "$(_opt GGML_AVX512_VNNI avx512_vnni)" "$(_opt GGML_AVX512_BF16 avx512_bf16)"
  -DGGML_AVX_VNNI=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
unset -f _has _opt
unset _flags
