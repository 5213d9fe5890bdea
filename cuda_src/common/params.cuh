// By-value kernel parameter structs: what every kernel file that takes one `const XxxParams p`
// shares.
//
// Every field of such a struct is 8 bytes wide (pointers, long long, unsigned long long): no
// padding, so the host packs it as int64 words in declaration order (deepep_cupy/kernel_params.py,
// one ParamStruct of the same name per struct; tests/test_kernel_params.py compares the two).
// Kernels copy the fields into locals under the names their bodies use; inputs that were
// `const T* __restrict__` parameters become ReadOnly<T>, which keeps their ld.global.nc loads.
#pragma once
#include "common/utils.cuh"

// T has N fields, all 8 bytes (the drift test reads N too): keeps a narrower field from slipping in.
#define DEEPEP_PARAMS_CHECK(T, N) \
    static_assert(sizeof(T) == 8 * (N) && alignof(T) == 8, #T ": every field must be 8 bytes")

namespace deepep {

// A kernel input that nothing writes while the kernel runs, read with ld.global.nc (__ldg). As a
// `const T* __restrict__` kernel parameter the compiler proved that itself; a pointer from a
// parameter struct it cannot (not even as a __restrict__ local: the kernels' asm memory clobbers
// defeat it), so the kernels wrap such fields in this. Indexing loads; it converts to the plain
// pointer for pointer arithmetic (a load through that pointer is a plain one).
template <typename T>
struct ReadOnly {
    const T* ptr;
    DEEPEP_DEVICE operator const T*() const { return ptr; }
    DEEPEP_DEVICE T operator[](long long i) const {
        if constexpr (sizeof(T) == 1) return static_cast<T>(__ldg(reinterpret_cast<const unsigned char*>(ptr + i)));
        else return __ldg(ptr + i);
    }
};

}  // namespace deepep
