// Error reporting from kernels to Python, and bounded waits.
//
// Every kernel that waits on a peer takes an `ErrorRecord*` (4 int32, zeroed by the host) and a
// timeout in nanoseconds. A wait that runs out records {code, phase, peer, rank} (first writer
// wins) and the kernel returns. The record lives in device memory read after a sync (self-test),
// or in pinned host memory read without a sync (the intranode kernels: at the notify poll and at
// the start of the next call; likewise the low-latency kernels' record and the layout kernel's
// input-check record, checks.DeviceInputErrors); the host raises DeepEPTimeout (DeepEPInvalid for a
// bad value) naming the rank, the phase and the peer.
// Phase ids are listed in deepep_cupy/kernel_errors.py.
#pragma once
#include "common/utils.cuh"

namespace deepep {

enum ErrorCode : int { kOk = 0, kTimeout = 1, kBadValue = 2 };

struct ErrorRecord {
    int code;
    int phase;
    int peer;
    int rank;
};

DEEPEP_DEVICE void record_error(ErrorRecord* rec, int code, int phase, int peer, int rank) {
    if (atomicCAS(&rec->code, 0, code) == 0) {
        rec->phase = phase;
        rec->peer = peer;
        rec->rank = rank;
        __threadfence_system();
    }
}

// Spin until ready() holds or the deadline passes. Returns true on success; on timeout records the
// error and returns false. Every bounded wait of the kernels is this loop over its own condition.
template <typename Ready>
DEEPEP_DEVICE bool wait_until(Ready ready, uint64_t timeout_ns, ErrorRecord* rec, int phase, int peer, int rank) {
    const uint64_t start = global_timer_ns();
    while (!ready()) {
        if (global_timer_ns() - start > timeout_ns) {
            record_error(rec, kTimeout, phase, peer, rank);
            return false;
        }
    }
    return true;
}

// Spin until *flag >= expected (acquire, system scope) or the deadline passes (see wait_until).
DEEPEP_DEVICE bool wait_geq(const uint64_t* flag, uint64_t expected, uint64_t timeout_ns,
                            ErrorRecord* rec, int phase, int peer, int rank) {
    return wait_until([&] { return ld_acquire_sys(flag) >= expected; }, timeout_ns, rec, phase, peer, rank);
}

}  // namespace deepep
