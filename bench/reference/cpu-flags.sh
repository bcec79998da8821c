# The llama.cpp CPU options both reference builds use (sourced by
# setup-llama-server.sh and setup-llamacpp.sh): GGML_NATIVE=OFF with an
# explicit x86-64 AVX-512 set, since GGML_NATIVE=ON picks instructions a
# VM's hypervisor may not pass through (the binary then dies with SIGILL).
# All of these are in /proc/cpuinfo of the Xeon VMs.
CPU_FLAGS=(
  -DGGML_NATIVE=OFF
  -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON
  -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
  -DGGML_AVX_VNNI=OFF
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
