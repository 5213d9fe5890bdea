// The NVSHMEM device API, made to compile under both NVRTC and nvcc.
//
// Under NVRTC the headers cannot see <infiniband/mlx5dv.h>, so the device-initiated InfiniBand
// (IBGDA) paths are switched off after NVSHMEM's build-options header is read (it is #pragma once).
// NVSHMEM 3.3/3.4 headers also use std:: type traits that NVRTC lacks: alias libcu++'s.
// The nvcc route keeps IBGDA (see deepep_cupy/jit.py).
#pragma once
#include <non_abi/nvshmem_build_options.h>
#ifdef __CUDACC_RTC__
#undef NVSHMEM_IBGDA_SUPPORT
#undef NVSHMEM_IBGDA_SUPPORT_GPUMEM_ONLY
#undef NVSHMEM_GPUNETIO_SUPPORT
#if DEEPEP_NVSHMEM_VERSION < 30500
#include <cuda/std/type_traits>
namespace std {
using cuda::std::is_floating_point;
using cuda::std::is_integral;
using cuda::std::is_same;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
}  // namespace std
#endif
#endif
#include <nvshmem.h>
#include <nvshmemx.h>
