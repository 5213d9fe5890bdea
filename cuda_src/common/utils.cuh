// Small device helpers shared by every kernel: integer types, vector access, PTX wrappers.
#pragma once

#ifdef __CUDACC_RTC__
#include <cuda/std/cstdint>
using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint8_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
#else
#include <cstdint>
#endif

#define DEEPEP_DEVICE __device__ __forceinline__

namespace deepep {

template <typename T>
DEEPEP_DEVICE constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// Nanoseconds from the GPU's global timer (same clock on every SM).
DEEPEP_DEVICE uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// 16-byte load of input data the kernel never writes (no L1 allocation: each byte is read once).
DEEPEP_DEVICE int4 ld_nc_16(const int4* p) {
    int4 v;
    asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

DEEPEP_DEVICE uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

DEEPEP_DEVICE int ld_acquire_sys(const int* p) {
    int v;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

DEEPEP_DEVICE void st_release_sys(int* p, int v) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

}  // namespace deepep
