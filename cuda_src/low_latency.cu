// Low-latency dispatch and combine (decode). Design, buffer layout and protocol: docs/low_latency.md.
//
// Every rank's low-latency region (inside its symmetric buffer, same offsets on all ranks) has two
// halves; operation number `seq` (1, 2, ... counted alike on every rank) uses half `seq & 1`:
//   recv_msgs      [R sources][M tokens][msg_bytes]   one message per (source token, this rank)
//   recv_meta      [R sources][meta_ints] int32       {num_tokens, entries per local expert [L]}
//   recv_flags     [R sources] uint64                 raised to seq after the source's messages
//   combine_rows   [M tokens][K slots][H] bf16        expert outputs for this rank's tokens
//   combine_flags  [R sources] uint64                 raised to seq after the source's rows (diagnosis)
//   combine_arrived[M tokens] uint64                   row parts of each token that have arrived
//   send_msgs      [M tokens][msg_bytes]              messages staged for NVSHMEM puts
//   combine_stage  [R dests][M*K rows][H] bf16        combine rows staged for NVSHMEM puts
//   meta_stage     [R dests][meta_ints] int32         metas staged for NVSHMEM puts
// A message: 16-byte header {int32 source token, int32 seq tag, 2 x pad}, K int32 expert ids,
// K int32 slots (rank of this (token, k) among the source's entries for that expert), padded to
// 16 bytes, then the payload: bf16 [H], or fp8 [H] + float32 scales [H/128] (UE8M0: bytes, padded
// to 4).
//
// Peers whose base pointer is non-zero are written with 16-byte stores over NVLink, straight from
// registers; a zero base means "use NVSHMEM puts" (RDMA, or forced for testing) from the staging
// areas. Two sequence counters live in device memory: seq[0] counts operations sent, seq[1]
// operations received. A send kernel uses seq[0] + 1 and its last block advances seq[0]; a receive
// kernel does the same with seq[1]. So two operations can be in flight (send A, send B, receive A,
// receive B) and CUDA-graph replays stay in step without the host.
#include "common/exception.cuh"
#include "common/nvshmem.cuh"
#include "common/params.cuh"
#include "common/utils.cuh"

#ifndef DEEPEP_NUM_RANKS
#error "DEEPEP_NUM_RANKS must be defined"
#endif

namespace {

using deepep::ReadOnly;   // common/params.cuh

constexpr int kNumRanks = DEEPEP_NUM_RANKS;
// destination sets are 32-bit masks; more ranks need the internode low-latency design
static_assert(kNumRanks >= 1 && kNumRanks <= 32, "low-latency kernels support up to 32 ranks");
constexpr int kWarpSize = 32;
constexpr int kHeaderBytes = 16;
constexpr int kMaxTopk = 16;              // deepep_cupy.low_latency.MAX_TOPK
constexpr int kMaxExperts = 1024;         // deepep_cupy.low_latency.MAX_EXPERTS
constexpr int kMaxHidden = 8192;          // deepep_cupy.low_latency.MAX_HIDDEN
constexpr unsigned int kFullMask = 0xffffffffu;

constexpr int kPhaseLLDispatchRecv = 20;  // names in deepep_cupy/kernel_errors.py
constexpr int kPhaseLLCombineRecv = 21;
constexpr int kPhaseLLTooMany = 22;
constexpr int kPhaseLLReuse = 23;
constexpr int kPhaseBadExpertId = 24;

struct LLLayout {
    long long half_bytes;
    long long recv_msgs;
    long long recv_meta;
    long long recv_flags;
    long long combine_rows;
    long long combine_flags;
    long long send_msgs;
    long long combine_stage;
    long long meta_stage;
    long long control;           // after both halves: uint64 operations received (read by peers)
    long long combine_arrived;
    int msg_bytes;
    int meta_ints;
    int max_tokens;   // M
    int max_topk;     // K the combine rows were sized for
};

struct LLShape {
    int num_tokens, hidden, num_topk, num_experts;   // T (this rank), H, K, E
    int use_fp8, round_scale, use_ue8m0;
};

// The call's shape from a kernel's params struct (every struct has these fields, by these names).
template <class P>
DEEPEP_DEVICE LLShape shape_of(const P& p) {
    return LLShape{static_cast<int>(p.num_tokens), static_cast<int>(p.hidden), static_cast<int>(p.num_topk),
                   static_cast<int>(p.num_experts), static_cast<int>(p.use_fp8), static_cast<int>(p.round_scale),
                   static_cast<int>(p.use_ue8m0)};
}

// header + ids + slots, padded to 16 bytes: where the payload starts
DEEPEP_DEVICE int ids_bytes(int num_topk) { return (kHeaderBytes + 8 * num_topk + 15) / 16 * 16; }

// An expert id read from topk_idx as an int: itself inside [0, num_experts), else -1 ("none"). Ids
// outside the range must never index the per-expert counts or pick a destination bit, and are
// compared before the narrowing, so an int64 like 2^32 + 3 cannot alias expert 3.
DEEPEP_DEVICE int expert_or_none(int64_t e, int num_experts) {
    return e >= 0 && e < num_experts ? static_cast<int>(e) : -1;
}

// A reported value fits the record's int32 field: clamp (the host says "or beyond" at the bounds).
DEEPEP_DEVICE int clamp_to_int32(long long v) {
    return static_cast<int>(v < -2147483648LL ? -2147483648LL : (v > 2147483647LL ? 2147483647LL : v));
}

DEEPEP_DEVICE uint64_t next_seq(const uint64_t* counter) {
    return *reinterpret_cast<const volatile uint64_t*>(counter) + 1;
}

DEEPEP_DEVICE void st_release_u64(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A warp copies `bytes` (a multiple of 16), kUnroll 16-byte loads in flight per lane.
template <int kUnroll>
DEEPEP_DEVICE void warp_copy16(void* dst, const void* src, int bytes, int lane) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    const int n = bytes >> 4;
    for (int base = lane; base < n; base += kWarpSize * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * kWarpSize < n) v[u] = __ldcg(s + base + u * kWarpSize);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * kWarpSize < n) d[base + u * kWarpSize] = v[u];
    }
}

DEEPEP_DEVICE float bf16_to_float(unsigned short b) { return __uint_as_float(static_cast<unsigned int>(b) << 16); }

DEEPEP_DEVICE unsigned short float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

// two floats -> two e4m3fn bytes (lo, hi), round to nearest even, saturating at +-448
DEEPEP_DEVICE unsigned int float2_to_e4m3x2(float lo, float hi) {
    unsigned short packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// A role: warps [first_warp, first_warp + num_warps) of every block, with named barrier bar_id.
struct Role {
    int first_warp, num_warps, bar_id;
    DEEPEP_DEVICE int tid() const { return static_cast<int>(threadIdx.x) - first_warp * kWarpSize; }
    DEEPEP_DEVICE int threads() const { return num_warps * kWarpSize; }
    DEEPEP_DEVICE int global_warp() const {
        return static_cast<int>(blockIdx.x) * num_warps + static_cast<int>(threadIdx.x) / kWarpSize - first_warp;
    }
    DEEPEP_DEVICE int global_warps() const { return static_cast<int>(gridDim.x) * num_warps; }
    DEEPEP_DEVICE void sync() const { asm volatile("bar.sync %0, %1;" ::"r"(bar_id), "r"(threads()) : "memory"); }
    // Last block of the grid to get here (after its role's work) gets true in every thread of the
    // role; the counter is left zero. kPublish: the last block will release other blocks' stores to
    // peers, so each block fences its own stores at system scope first; receive kernels only need
    // the count.
    template <bool kPublish>
    DEEPEP_DEVICE bool last_block_done(unsigned int* counter, bool* s_last) const {
        sync();
        if (tid() == 0) {
            if (kPublish) __threadfence_system();
            *s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
            if (*s_last) *counter = 0;
        }
        sync();
        return *s_last;
    }
};

// Role::last_block_done for the whole block (barrier 0 over every thread is __syncthreads).
template <bool kPublish>
DEEPEP_DEVICE bool last_block_done(unsigned int* counter) {
    __shared__ bool last;
    return Role{0, static_cast<int>(blockDim.x) / kWarpSize, 0}.last_block_done<kPublish>(counter, &last);
}

// Thread 0 of every block waits for flags[s] >= seq for every source; the block learns the outcome.
DEEPEP_DEVICE bool block_wait_all(const uint64_t* flags, uint64_t seq, uint64_t timeout_ns,
                                  deepep::ErrorRecord* err, int phase, int rank) {
    __shared__ bool ok;
    if (threadIdx.x == 0) {
        ok = true;
        for (int s = 0; s < kNumRanks && ok; ++s)
            ok = deepep::wait_geq(flags + s, seq, timeout_ns, err, phase, s, rank);
    }
    __syncthreads();
    return ok;
}

// Bitmask of the ranks whose region base is zero (reached through NVSHMEM puts).
DEEPEP_DEVICE unsigned int put_ranks(ReadOnly<uint64_t> peer_regions) {
    unsigned int m = 0;
    for (int r = 0; r < kNumRanks; ++r) m |= peer_regions[r] == 0 ? (1u << r) : 0u;
    return m;
}

// A peer's operations-received word through NVSHMEM (puts peers); not inlined: the get would take
// registers from the kernels' main loops.
__device__ __noinline__ uint64_t get_control(const uint64_t* word, int pe) { return nvshmem_uint64_g(word, pe); }

// Before operation `seq` writes into a half, every peer must have received operation seq - 2 (the
// last one in that half). Only needed after two operations were in flight at once (the host decides).
DEEPEP_DEVICE bool wait_peers_received(uint8_t* region, const uint64_t* peers, const LLLayout& lay, uint64_t seq,
                                       uint64_t timeout_ns, deepep::ErrorRecord* err, int rank) {
    __shared__ bool ok;
    if (threadIdx.x == 0) ok = true;
    __syncthreads();
    if (threadIdx.x < kNumRanks && seq > 2) {
        const int r = threadIdx.x;
        const uint64_t start = deepep::global_timer_ns();
        while (true) {
            const uint64_t done = peers[r] != 0
                ? deepep::ld_acquire_sys(reinterpret_cast<const uint64_t*>(reinterpret_cast<uint8_t*>(peers[r]) + lay.control))
                : get_control(reinterpret_cast<const uint64_t*>(region + lay.control), r);
            if (done >= seq - 2) break;
            if (deepep::global_timer_ns() - start > timeout_ns) {
                deepep::record_error(err, deepep::kTimeout, kPhaseLLReuse, r, rank);
                ok = false;
                break;
            }
        }
    }
    __syncthreads();
    return ok;
}

// Whether a wait of this buffer has timed out (this call's or an earlier one's). A sender that sees
// it writes no meta and raises no flag: peers then time out naming this rank instead of reading a
// half that a lagging peer may still need (after a timeout the buffer is to be destroyed).
DEEPEP_DEVICE bool buffer_timed_out(const deepep::ErrorRecord* err) {
    return *reinterpret_cast<const volatile int*>(&err->code) == deepep::kTimeout;
}

// The receive half's last block: publish the operation count (peers' guards read it) and advance.
DEEPEP_DEVICE void finish_receive(uint8_t* region, const LLLayout& lay, uint64_t* seq_ptr, uint64_t seq) {
    *seq_ptr = seq;
    st_release_u64(reinterpret_cast<uint64_t*>(region + lay.control), seq);
}

}  // namespace

#include "low_latency_params.cuh"   // one by-value params struct per kernel

// ------------------------------------------------------------------------------------------------
// dispatch send: a block per token (grid-stride). The block first ranks its token's K entries among
// this rank's entries for the same expert in (t, k) order (a ballot scan over the entries before
// them: deterministic, no prepare kernel) and adds them to the per-expert counts. Warp 0 builds the
// header in shared memory and the destination mask; then every thread produces 16-byte chunks of
// the message (a header chunk, bf16 channels, or 16 channels cast to fp8 with their 128-channel
// group's scale) and stores each chunk to every NVLink destination and, when a destination needs
// puts, to the staging message, which warp r then puts to rank r. The last block writes every
// destination's meta (and zeroes the counts) and raises its flag. An expert chosen more than M
// times by this rank (only duplicates in a row can do that) keeps M entries and reports. An id
// outside [-1, num_experts) travels as -1 (sent nowhere) and is reported once per block (phase 24).
// P: LLDispatchSendParams or LLDispatchParams (the fused kernel passes its send counters).
template <class P>
DEEPEP_DEVICE void dispatch_send_body(const P& p, uint64_t* seq_ptr, unsigned int* done_counter) {
    // the fields under the names the body uses: inputs as ReadOnly (the const __restrict__
    // parameters' ld.global.nc), outputs as __restrict__ locals
    const ReadOnly<unsigned short> x{p.x};
    const ReadOnly<int64_t> topk_idx{p.topk_idx};
    int* __restrict__ counts = p.counts;
    int* __restrict__ topk_slots = p.topk_slots;
    const ReadOnly<uint64_t> peer_regions{p.peer_regions};
    uint8_t* const region = p.region;
    const int rank = static_cast<int>(p.rank), guard = static_cast<int>(p.guard);
    const uint64_t timeout_ns = p.timeout_ns;
    deepep::ErrorRecord* const err = p.err;
    const LLLayout lay = *p.layout;
    const LLShape shape = shape_of(p);
    const uint64_t seq = next_seq(seq_ptr);
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int H = shape.hidden, K = shape.num_topk;
    const int num_local = shape.num_experts / kNumRanks;
    const long long half_off = static_cast<long long>(seq & 1) * lay.half_bytes;
    const int payload = ids_bytes(K);
    const unsigned int put_mask = put_ranks(peer_regions);

    __shared__ uint64_t s_peers[kNumRanks];
    __shared__ int4 s_hdr[(kHeaderBytes + 8 * kMaxTopk + 15) / 16];
    __shared__ unsigned int s_mask;
    __shared__ int s_expert[kMaxTopk];
    __shared__ int s_before[kMaxTopk];     // entries before (t, k) with the same expert
    __shared__ int s_bad;                  // an id outside [-1, E) was seen; s_bad_id: one of them
    __shared__ long long s_bad_id;
    if (threadIdx.x < kNumRanks) s_peers[threadIdx.x] = peer_regions[threadIdx.x];
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();
    // a guard that timed out sends nothing (block-uniform: `ok` is shared)
    const bool guard_ok = !guard || wait_peers_received(region, s_peers, lay, seq, timeout_ns, err, rank);

    for (int t = blockIdx.x; guard_ok && t < shape.num_tokens; t += gridDim.x) {
        const long long first = static_cast<long long>(t) * K;
        if (threadIdx.x < K) {
            const int64_t raw = topk_idx[first + threadIdx.x];
            s_expert[threadIdx.x] = expert_or_none(raw, shape.num_experts);
            if (raw < -1 || raw >= shape.num_experts) {
                if (atomicCAS(&s_bad, 0, 1) == 0) s_bad_id = raw;
            }
            s_before[threadIdx.x] = 0;
        }
        __syncthreads();
        // count entries j < first + k with the same expert; warp-aggregated shared atomics
        const int span = static_cast<int>(first) + K;
        for (int j0 = warp * kWarpSize; j0 < span; j0 += blockDim.x) {
            const int j = j0 + lane;
            const int e = j < span ? expert_or_none(topk_idx[j], shape.num_experts) : -1;
            for (int k = 0; k < K; ++k) {
                const int ek = s_expert[k];
                const unsigned int hits = __ballot_sync(kFullMask, ek >= 0 && e == ek && j < first + k);
                if (lane == 0 && hits) atomicAdd(&s_before[k], __popc(hits));
            }
        }
        __syncthreads();
        if (warp == 0) {
            int* hdr = reinterpret_cast<int*>(s_hdr);
            long long e = -1;
            if (lane < K) {
                e = s_expert[lane];
                int slot = -1;
                if (e >= 0) {
                    slot = s_before[lane];
                    if (slot < lay.max_tokens) atomicAdd(counts + e, 1);
                    else {
                        deepep::record_error(err, deepep::kBadValue, kPhaseLLTooMany, static_cast<int>(e), rank);
                        slot = -1;
                    }
                }
                hdr[4 + lane] = static_cast<int>(e);
                hdr[4 + K + lane] = slot;
                topk_slots[first + lane] = slot;   // the combine reads this rank's own rows in place
            }
            if (lane == 0) {
                hdr[0] = t;
                hdr[1] = static_cast<int>(seq & 0x7fffffff);
                hdr[2] = hdr[3] = 0;
            }
            for (int i = 4 + 2 * K + lane; i < payload / 4; i += kWarpSize) hdr[i] = 0;
            const unsigned int bit = e >= 0 ? 1u << static_cast<int>(e / num_local) : 0u;
            const unsigned int mask = __reduce_or_sync(kFullMask, bit);
            if (lane == 0) s_mask = mask;
        }
        __syncthreads();
        const unsigned int mask = s_mask;
        const bool stage = (mask & put_mask) != 0;
        const unsigned int store_mask = mask & ~put_mask;
        const long long msg_off = half_off + lay.recv_msgs +
                                  (static_cast<long long>(rank) * lay.max_tokens + t) * lay.msg_bytes;
        uint8_t* staged = region + half_off + lay.send_msgs + static_cast<long long>(t) * lay.msg_bytes;
        // one piece of the message (16, 4 or 1 bytes at byte offset o) to every destination
        auto emit16 = [&](int o, int4 v) {
            for (unsigned int m = store_mask; m; m &= m - 1)
                *reinterpret_cast<int4*>(reinterpret_cast<uint8_t*>(s_peers[__ffs(m) - 1]) + msg_off + o) = v;
            if (stage) *reinterpret_cast<int4*>(staged + o) = v;
        };
        auto emit4 = [&](int o, float v) {
            for (unsigned int m = store_mask; m; m &= m - 1)
                *reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(s_peers[__ffs(m) - 1]) + msg_off + o) = v;
            if (stage) *reinterpret_cast<float*>(staged + o) = v;
        };
        auto emit1 = [&](int o, uint8_t v) {
            for (unsigned int m = store_mask; m; m &= m - 1)
                *(reinterpret_cast<uint8_t*>(s_peers[__ffs(m) - 1]) + msg_off + o) = v;
            if (stage) staged[o] = v;
        };
        if (threadIdx.x < payload / 16) emit16(16 * threadIdx.x, s_hdr[threadIdx.x]);

        const int4* row = reinterpret_cast<const int4*>(x + static_cast<long long>(t) * H);
        if (!shape.use_fp8) {
            for (int i = threadIdx.x; i < H / 8; i += blockDim.x) emit16(payload + 16 * i, __ldg(row + i));
        } else {
            // 16 channels per lane, 8 lanes per 128-channel group; loop bounds are warp-uniform so
            // every lane takes part in the shuffles
            const int n16 = H / 16;
            if (shape.use_ue8m0 && threadIdx.x < (H / 128 + 3) / 4 * 4 - H / 128)   // zero the padding
                emit1(payload + H + H / 128 + threadIdx.x, 0);
            for (int c0 = warp * kWarpSize; c0 < n16; c0 += blockDim.x) {
                const int c = c0 + lane;
                const bool active = c < n16;
                int4 raw[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};
                if (active) {
                    raw[0] = __ldg(row + 2 * c);
                    raw[1] = __ldg(row + 2 * c + 1);
                }
                const unsigned short* h16 = reinterpret_cast<const unsigned short*>(raw);
                float v[16];
                float amax = 0.0f;
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    v[i] = bf16_to_float(h16[i]);
                    amax = fmaxf(amax, fabsf(v[i]));
                }
#pragma unroll
                for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, o));
                amax = fmaxf(amax, 1e-4f);
                float scale, scale_inv;
                int exponent = 0;
                if (shape.round_scale) {
                    // 2^ceil(log2(amax / 448)) from the bits of the correctly rounded quotient
                    const unsigned int bits = __float_as_uint(__fdiv_rn(amax, 448.0f));
                    exponent = static_cast<int>((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) ? 1 : 0);
                    scale_inv = __uint_as_float(static_cast<unsigned int>(exponent + 127) << 23);
                    scale = __uint_as_float(static_cast<unsigned int>(127 - exponent) << 23);
                } else {
                    scale = __fdiv_rn(448.0f, amax);
                    scale_inv = __fdiv_rn(amax, 448.0f);
                }
                unsigned int words[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float a = fminf(fmaxf(__fmul_rn(v[4 * i], scale), -448.0f), 448.0f);
                    const float b = fminf(fmaxf(__fmul_rn(v[4 * i + 1], scale), -448.0f), 448.0f);
                    const float c2 = fminf(fmaxf(__fmul_rn(v[4 * i + 2], scale), -448.0f), 448.0f);
                    const float d = fminf(fmaxf(__fmul_rn(v[4 * i + 3], scale), -448.0f), 448.0f);
                    words[i] = float2_to_e4m3x2(a, b) | (float2_to_e4m3x2(c2, d) << 16);
                }
                if (active) {
                    emit16(payload + 16 * c, make_int4(words[0], words[1], words[2], words[3]));
                    if ((lane & 7) == 0) {
                        const int group = c / 8;
                        if (shape.use_ue8m0) emit1(payload + H + group, static_cast<uint8_t>(exponent + 127));
                        else emit4(payload + H + 4 * group, scale_inv);
                    }
                }
            }
        }
        __syncthreads();   // the staged message is complete; s_hdr / s_mask may be rewritten
        if (stage) {
            for (int r = warp; r < kNumRanks; r += blockDim.x / kWarpSize) {
                if (!((mask & put_mask) >> r & 1u)) continue;
                __threadfence();   // the block's staging writes are visible to the transport
                nvshmemx_putmem_nbi_warp(region + msg_off, staged, lay.msg_bytes, r);
            }
        }
    }
    if (put_mask && threadIdx.x == 0) nvshmem_quiet();
    // s_bad was last written before the loop's final __syncthreads; one host write per block at most
    if (threadIdx.x == 0 && s_bad)
        deepep::record_error(err, deepep::kBadValue, kPhaseBadExpertId, clamp_to_int32(s_bad_id), rank);
    if (!last_block_done<true>(done_counter)) return;   // the caller continues (fused kernels)
    if (buffer_timed_out(err)) {   // no meta, no flags (see buffer_timed_out)
        if (threadIdx.x == 0) *seq_ptr = seq;
        return;
    }
    // meta of every destination, then its flag
    const int meta_len = 1 + num_local;
    const long long meta_off = half_off + lay.recv_meta + static_cast<long long>(rank) * lay.meta_ints * 4;
    for (int i = threadIdx.x; i < kNumRanks * meta_len; i += blockDim.x) {
        const int r = i / meta_len, j = i % meta_len;
        const int value = j == 0 ? shape.num_tokens : static_cast<int>(atomicExch(counts + r * num_local + j - 1, 0));
        int* meta = s_peers[r] != 0 ? reinterpret_cast<int*>(reinterpret_cast<uint8_t*>(s_peers[r]) + meta_off)
                                    : reinterpret_cast<int*>(region + half_off + lay.meta_stage) + r * lay.meta_ints;
        meta[j] = value;
    }
    __syncthreads();
    if (threadIdx.x < kNumRanks) {
        const int r = threadIdx.x;
        const long long flag_off = half_off + lay.recv_flags + static_cast<long long>(rank) * 8;
        if (s_peers[r] != 0) {
            __threadfence_system();
            st_release_u64(reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(s_peers[r]) + flag_off), seq);
        } else {
            nvshmem_putmem(region + meta_off, reinterpret_cast<int*>(region + half_off + lay.meta_stage) + r * lay.meta_ints,
                           4 * meta_len, r);
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(region + flag_off), seq, NVSHMEM_SIGNAL_SET, r);
        }
    }
    if (threadIdx.x == 0) *seq_ptr = seq;
}

// ------------------------------------------------------------------------------------------------
// dispatch receive: wait for every source's flag, derive layout_begin[l][s] from the metas, then a
// warp per (source, token, k) entry copies the payload to recv_x[l][begin(l, s) + slot] when
// expert l is local. For the combine it records the inverse map combine_slot[s][t][k] (that row of
// recv_x, or -1) and src_tokens[s]. The last block advances the receive counter.
// P: LLDispatchRecvParams or LLDispatchParams (the fused kernel passes its receive counters).
template <class P>
DEEPEP_DEVICE void dispatch_recv_body(const P& p, uint64_t* seq_ptr, unsigned int* done_counter) {
    uint8_t* __restrict__ recv_x = p.recv_x;   // outputs only: nothing to read through ReadOnly
    uint8_t* __restrict__ recv_scales = p.recv_scales;
    int* __restrict__ recv_count = p.recv_count;
    int* __restrict__ recv_src_info = p.recv_src_info;
    int* __restrict__ recv_src_k = p.recv_src_k;
    int* __restrict__ layout_begin = p.layout_begin;
    int* __restrict__ layout_count = p.layout_count;
    int* __restrict__ combine_slot = p.combine_slot;
    int* __restrict__ src_tokens = p.src_tokens;
    uint8_t* const region = p.region;
    const int rank = static_cast<int>(p.rank);
    const uint64_t timeout_ns = p.timeout_ns;
    deepep::ErrorRecord* const err = p.err;
    const LLLayout lay = *p.layout;
    const LLShape shape = shape_of(p);
    const uint64_t seq = next_seq(seq_ptr);
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int H = shape.hidden, K = shape.num_topk, M = lay.max_tokens;
    const int num_local = shape.num_experts / kNumRanks;
    const int expert_lo = rank * num_local;
    uint8_t* half = region + static_cast<long long>(seq & 1) * lay.half_bytes;
    const int slot_stride = kNumRanks * M;   // slots per local expert in recv_x
    const int scale_bytes = shape.use_fp8 ? (shape.use_ue8m0 ? (H / 128 + 3) / 4 * 4 : H / 32) : 0;
    const int data_bytes = shape.use_fp8 ? H : 2 * H;
    const int payload = ids_bytes(K);

    // per block: every source's token count and the exclusive prefix over sources of the counts
    // per local expert (begin[l][s]), read once from the metas into shared memory
    __shared__ int s_tokens[kNumRanks];
    __shared__ int s_begin[kMaxExperts];   // [num_local][kNumRanks] <= E entries
    const bool ok = block_wait_all(reinterpret_cast<uint64_t*>(half + lay.recv_flags), seq, timeout_ns, err,
                                   kPhaseLLDispatchRecv, rank);
    const int* metas = reinterpret_cast<const int*>(half + lay.recv_meta);
    if (threadIdx.x < kNumRanks) {
        s_tokens[threadIdx.x] = ok ? __ldcg(metas + threadIdx.x * lay.meta_ints) : 0;
        if (blockIdx.x == 0) src_tokens[threadIdx.x] = s_tokens[threadIdx.x];
    }
    for (int l = threadIdx.x; l < num_local; l += blockDim.x) {
        int acc = 0;
        for (int s = 0; s < kNumRanks; ++s) {
            const int c = ok ? __ldcg(metas + s * lay.meta_ints + 1 + l) : 0;
            s_begin[l * kNumRanks + s] = acc;
            if (blockIdx.x == 0) {
                layout_begin[l * kNumRanks + s] = acc;
                layout_count[l * kNumRanks + s] = c;
            }
            acc += c;
        }
        if (blockIdx.x == 0) recv_count[l] = acc;
    }
    __syncthreads();
    if (ok) {
        int total = 0;
        for (int s = 0; s < kNumRanks; ++s) total += s_tokens[s] * K;
        const int gwarps = gridDim.x * num_warps;
        for (int j = blockIdx.x * num_warps + warp; j < total; j += gwarps) {
            int s = 0, jj = j;
            while (jj >= s_tokens[s] * K) jj -= s_tokens[s++] * K;
            const int t = jj / K, k = jj % K;
            const uint8_t* msg = half + lay.recv_msgs + (static_cast<long long>(s) * M + t) * lay.msg_bytes;
            const int* header = reinterpret_cast<const int*>(msg);
            int* entry_slot = combine_slot + (static_cast<long long>(s) * M + t) * K + k;
            if (__ldcg(header + 1) != static_cast<int>(seq & 0x7fffffff)) {   // not sent to me
                if (lane == 0) *entry_slot = -1;
                continue;
            }
            const int e = __ldcg(header + 4 + k), slot = __ldcg(header + 4 + K + k);
            if (e < expert_lo || e >= expert_lo + num_local || slot < 0) {
                if (lane == 0) *entry_slot = -1;
                continue;
            }
            const int l = e - expert_lo;
            const long long pos = static_cast<long long>(l) * slot_stride + s_begin[l * kNumRanks + s] + slot;
            warp_copy16<8>(recv_x + pos * data_bytes, msg + payload, data_bytes, lane);
            for (int i = lane; i < scale_bytes / 4; i += kWarpSize)
                reinterpret_cast<int*>(recv_scales + pos * scale_bytes)[i] =
                    __ldcg(reinterpret_cast<const int*>(msg + payload + data_bytes) + i);
            if (lane == 0) {
                recv_src_info[pos] = __ldcg(header);
                recv_src_k[pos] = k;
                *entry_slot = static_cast<int>(pos);   // the combine sends in token order with it
            }
        }
    }
    if (last_block_done<false>(done_counter) && threadIdx.x == 0) finish_receive(region, lay, seq_ptr, seq);
}


// ------------------------------------------------------------------------------------------------
// Combine. Every expert output row goes back to its token's rank as combine_rows[t][k] of the
// operation's half, in kCombineParts parts. After each part the sender adds 1 to the token's
// combine_arrived[t] at the destination (a release add after the part's stores, or the signal of an
// NVSHMEM put), and the receiver reduces token t once the count reaches kCombineParts x (entries of
// t the dispatch placed). Rows of this rank's own experts travel the same way through local memory.
// Senders walk (token, source, k) in token order (combine_slot, from the dispatch), so tokens
// complete one after another while the transfer runs, and the fused kernel's reducer warps follow
// right behind. The last sender block raises every source's flag; receivers read the flags only to
// name a missing peer. The last receiver block zeroes the counters it used.
constexpr int kCombineParts = 4;   // H * 2 / 4 bytes: a multiple of 16 for every H % 128 == 0

namespace {

DEEPEP_DEVICE void red_release_sys_add(uint64_t* p, uint64_t v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Puts path of a combine part: stage it, then one put that adds 1 to the token's arrival count
// behind the data. Not inlined: the NVSHMEM put would otherwise take registers from the NVLink path.
__device__ __noinline__ void put_part(uint8_t* region, uint8_t* stage, const uint8_t* src, long long dst_off,
                                      long long arrived_off, int part_bytes, int pe, int lane) {
    warp_copy16<8>(stage, src, part_bytes, lane);
    __threadfence();   // the staged part is visible to the transport
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(region + dst_off, stage, part_bytes, reinterpret_cast<uint64_t*>(region + arrived_off),
                                    1, NVSHMEM_SIGNAL_ADD, pe);
}

// The puts path's flag (after the puts to `pe`) and the final quiet; not inlined, as above.
__device__ __noinline__ void put_flag(uint8_t* region, long long flag_off, uint64_t seq, int pe) {
    nvshmem_fence();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(region + flag_off), seq, NVSHMEM_SIGNAL_SET, pe);
}

__device__ __noinline__ void quiet_puts() { nvshmem_quiet(); }

// TMA (bulk copy engine of the SM) path of the combine send, for remote NVLink peers when the
// launch asks for it: lane 0 of a sender warp bulk-loads a part of x into one of its two
// shared-memory stages (mbarrier completion), bulk-stores it into the peer, and adds the part's
// count only once that store has completed (one item later, or at the end), so two stores per warp
// are in flight. Shared memory: kTmaStageBytes x 2 per sender warp, dynamic.
constexpr int kTmaStageBytes = 2 * kMaxHidden / kCombineParts;

DEEPEP_DEVICE unsigned int smem_u32(const void* p) { return static_cast<unsigned int>(__cvta_generic_to_shared(p)); }

struct TmaSender {
    uint8_t* stages;          // this warp's 2 x kTmaStageBytes
    uint64_t* bars;           // this warp's 2 mbarriers
    unsigned int parity = 0;  // bit i: the phase stage i waits for next
    int stage = 0;
    uint64_t* pending = nullptr;   // count to add once the last store has completed

    DEEPEP_DEVICE void init() {   // lane 0
        for (int i = 0; i < 2; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bars + i)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    DEEPEP_DEVICE void release_pending(bool all) {
        if (all) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
        else asm volatile("cp.async.bulk.wait_group 1;" ::: "memory");
        if (pending != nullptr) {
            asm volatile("fence.proxy.async.global;" ::: "memory");   // the bulk writes before the count
            red_release_sys_add(pending, 1);
        }
    }
    // lane 0: copy `bytes` from src (local) to dst (peer), then count it on `counter` (peer)
    DEEPEP_DEVICE void send(uint8_t* dst, const uint8_t* src, int bytes, uint64_t* counter) {
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");   // the stage's last store has read it
        const unsigned int b = smem_u32(bars + stage), buf = smem_u32(stages + stage * kTmaStageBytes);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(buf), "l"(src), "r"(bytes), "r"(b) : "memory");
        for (unsigned int done = 0; !done;)
            asm volatile("{\n .reg .pred q;\n mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n"
                         " selp.u32 %0, 1, 0, q;\n}" : "=r"(done) : "r"(b), "r"((parity >> stage) & 1u) : "memory");
        parity ^= 1u << stage;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(buf), "r"(bytes)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        release_pending(false);   // the previous store is complete: count it
        pending = counter;
        stage ^= 1;
    }
};

struct CombineShared {
    uint64_t peers[kNumRanks];
    int src_tokens[kNumRanks];
    int token_span;              // max over sources of src_tokens
    bool guard_ok;               // the reuse guard did not time out: send
    bool last_send, last_recv;
};

// Whole block, before the roles split: peers and source token counts into shared memory, and the
// reuse guard.
DEEPEP_DEVICE void combine_send_prologue(CombineShared& sh, ReadOnly<uint64_t> peer_regions, ReadOnly<int> src_tokens,
                                         uint8_t* region, const LLLayout& lay, uint64_t seq, int rank, int guard,
                                         uint64_t timeout_ns, deepep::ErrorRecord* err) {
    if (threadIdx.x < kNumRanks) {
        sh.peers[threadIdx.x] = peer_regions[threadIdx.x];
        sh.src_tokens[threadIdx.x] = src_tokens[threadIdx.x];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int span = 0;
        for (int s = 0; s < kNumRanks; ++s) span = max(span, sh.src_tokens[s]);
        sh.token_span = span;
    }
    const bool ok = !guard || wait_peers_received(region, sh.peers, lay, seq, timeout_ns, err, rank);
    if (threadIdx.x == 0) sh.guard_ok = ok;
    __syncthreads();
}

DEEPEP_DEVICE void combine_send_role(const Role& role, CombineShared& sh, const unsigned short* __restrict__ x,
                                     const int* __restrict__ combine_slot, const LLShape& shape, const LLLayout& lay,
                                     uint8_t* region, unsigned int put_mask, int rank, uint64_t seq, uint64_t* seq_ptr,
                                     unsigned int* done_counter, int use_tma, const deepep::ErrorRecord* err) {
    const int lane = threadIdx.x % kWarpSize;
    extern __shared__ __align__(128) uint8_t tma_smem[];
    __shared__ __align__(8) uint64_t tma_bars[16][2];
    const int role_warp = role.tid() / kWarpSize;
    TmaSender tma{tma_smem + role_warp * 2 * kTmaStageBytes, tma_bars[role_warp]};
    if (use_tma && lane == 0) tma.init();
    const int K = shape.num_topk, KMAX = lay.max_topk, M = lay.max_tokens;
    const long long row_bytes = 2LL * shape.hidden;
    const int part_bytes = static_cast<int>(row_bytes / kCombineParts);
    const long long half_off = static_cast<long long>(seq & 1) * lay.half_bytes;
    const int items = sh.guard_ok ? sh.token_span * kNumRanks * K * kCombineParts : 0;   // <= 2^21: M, K, R bounded
    for (int item = role.global_warp(); item < items; item += role.global_warps()) {
        const int part = item % kCombineParts;
        const int entry = item / kCombineParts;                        // (t, s, k), token-major
        const int k = entry % K;
        const int s = (entry / K) % kNumRanks;
        const int t = entry / (K * kNumRanks);
        if (t >= sh.src_tokens[s]) continue;
        const int slot = __ldg(combine_slot + (static_cast<long long>(s) * M + t) * K + k);
        if (slot < 0) continue;
        const uint8_t* src = reinterpret_cast<const uint8_t*>(x) + slot * row_bytes + part * part_bytes;
        const long long dst_off =
            half_off + lay.combine_rows + (static_cast<long long>(t) * KMAX + k) * row_bytes + part * part_bytes;
        const long long arrived_off = half_off + lay.combine_arrived + static_cast<long long>(t) * 8;
        const uint64_t base = s == rank ? reinterpret_cast<uint64_t>(region) : sh.peers[s];
        if (use_tma && s != rank && base != 0) {
            uint8_t* dst = reinterpret_cast<uint8_t*>(base);
            if (lane == 0) tma.send(dst + dst_off, src, part_bytes, reinterpret_cast<uint64_t*>(dst + arrived_off));
            __syncwarp();
        } else if (base != 0) {
            uint8_t* dst = reinterpret_cast<uint8_t*>(base);
            warp_copy16<4>(dst + dst_off, src, part_bytes, lane);   // 8 in flight spill under NVRTC
            __syncwarp();   // the lanes' stores come before lane 0's release add
            if (lane == 0) red_release_sys_add(reinterpret_cast<uint64_t*>(dst + arrived_off), 1);
        } else {
            uint8_t* stage = region + half_off + lay.combine_stage +
                             ((static_cast<long long>(s) * M + t) * KMAX + k) * row_bytes + part * part_bytes;
            put_part(region, stage, src, dst_off, arrived_off, part_bytes, s, lane);
        }
    }
    if (use_tma && lane == 0) tma.release_pending(true);
    if (put_mask && role.tid() == 0) quiet_puts();
    if (!role.last_block_done<true>(done_counter, &sh.last_send)) return;
    if (role.tid() < kNumRanks && !buffer_timed_out(err)) {   // no flags after a timeout (buffer_timed_out)
        const int s = role.tid();
        const long long flag_off = half_off + lay.combine_flags + static_cast<long long>(rank) * 8;
        const uint64_t base = s == rank ? reinterpret_cast<uint64_t>(region) : sh.peers[s];
        if (base != 0) st_release_u64(reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(base) + flag_off), seq);
        else put_flag(region, flag_off, seq, s);
    }
    if (role.tid() == 0) *seq_ptr = seq;
}

// Lane 0 of a reducer warp: wait until token t's parts have all arrived. It also gives up once
// another wait of this kernel has timed out. A timeout names the first source whose flag (raised
// after all of its sends) is still below seq, or -1 if every flag is up.
DEEPEP_DEVICE bool wait_token(const uint64_t* arrived, uint64_t expected, const uint64_t* flags, uint64_t seq,
                              uint64_t timeout_ns, deepep::ErrorRecord* err, int rank) {
    const uint64_t start = deepep::global_timer_ns();
    for (unsigned int polls = 1; deepep::ld_acquire_sys(arrived) < expected; ++polls) {
        if ((polls & 1023) != 0) continue;
        const uint64_t waited = deepep::global_timer_ns() - start;
        const bool mine = waited > timeout_ns;
        if (!mine && !(waited > 1000000 && *reinterpret_cast<volatile int*>(&err->code) == deepep::kTimeout))
            continue;
        if (mine) {
            int peer = -1;
            for (int s = 0; s < kNumRanks && peer < 0; ++s)
                if (deepep::ld_acquire_sys(flags + s) < seq) peer = s;
            deepep::record_error(err, deepep::kTimeout, kPhaseLLCombineRecv, peer, rank);
        }
        return false;
    }
    return true;
}

// A warp per (token, 32 x 8 channels), tokens in order: wait for the token's rows, then each lane
// sums w[t,k] * row[t][k] over the valid k in ascending order (float32, rounded once to bf16), up
// to 8 rows' loads in flight. Valid: combine's topk_idx >= 0 and placed by the dispatch (slot >= 0).
DEEPEP_DEVICE void combine_recv_role(const Role& role, bool* s_last, ReadOnly<int64_t> topk_idx,
                                     ReadOnly<float> topk_weights, unsigned short* __restrict__ out,
                                     ReadOnly<int> topk_slots, const LLShape& shape, const LLLayout& lay,
                                     uint8_t* region, int rank, uint64_t seq, uint64_t* seq_ptr,
                                     unsigned int* done_counter, uint64_t timeout_ns, deepep::ErrorRecord* err) {
    constexpr int kLoads = 8;
    const int lane = threadIdx.x % kWarpSize;
    const int H = shape.hidden, K = shape.num_topk, KMAX = lay.max_topk;
    const int row_vecs = H / 8, chunks = (row_vecs + kWarpSize - 1) / kWarpSize;
    uint8_t* half = region + static_cast<long long>(seq & 1) * lay.half_bytes;
    uint64_t* arrived = reinterpret_cast<uint64_t*>(half + lay.combine_arrived);
    const uint64_t* flags = reinterpret_cast<const uint64_t*>(half + lay.combine_flags);
    const int4* rows = reinterpret_cast<const int4*>(half + lay.combine_rows);
    const int items = shape.num_tokens * chunks;
    int ready = -1;   // the last token this warp saw complete
    for (int item = role.global_warp(); item < items; item += role.global_warps()) {
        const int t = item / chunks, h = item % chunks * kWarpSize + lane;
        if (t != ready) {
            const bool placed = lane < K && topk_slots[static_cast<long long>(t) * K + lane] >= 0;
            const uint64_t expected = static_cast<uint64_t>(__popc(__ballot_sync(kFullMask, placed))) * kCombineParts;
            int ok = 1;
            if (lane == 0) ok = wait_token(arrived + t, expected, flags, seq, timeout_ns, err, rank);
            if (!__shfl_sync(kFullMask, ok, 0)) break;
            __syncwarp();   // lane 0's acquire comes before every lane's loads
            ready = t;
        }
        if (h >= row_vecs) continue;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k0 = 0; k0 < K; k0 += kLoads) {
            int4 v[kLoads];
            float w[kLoads];
            bool on[kLoads];
#pragma unroll
            for (int u = 0; u < kLoads; ++u) {
                const long long j = static_cast<long long>(t) * K + k0 + u;
                on[u] = k0 + u < K && topk_idx[j] >= 0 && topk_slots[j] >= 0;
                w[u] = on[u] ? topk_weights[j] : 0.0f;
                v[u] = on[u] ? __ldcg(rows + (static_cast<long long>(t) * KMAX + k0 + u) * row_vecs + h)
                             : make_int4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < kLoads; ++u) {
                if (!on[u]) continue;
                const unsigned short* e = reinterpret_cast<const unsigned short*>(&v[u]);
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[q] = __fadd_rn(acc[q], __fmul_rn(w[u], bf16_to_float(e[q])));
            }
        }
        int4 o;
        unsigned short* ob = reinterpret_cast<unsigned short*>(&o);
#pragma unroll
        for (int q = 0; q < 8; ++q) ob[q] = float_to_bf16(acc[q]);
        reinterpret_cast<int4*>(out + static_cast<long long>(t) * H)[h] = o;
    }
    if (!role.last_block_done<false>(done_counter, s_last)) return;
    // Every source's flag, not only those of the sources my tokens needed: a peer raises it after its
    // combine send, which follows its receive of the dispatch that last used the other half. Without
    // this, a rank whose tokens avoid peer P could finish here and send the next dispatch into the
    // half whose dispatch P has not received yet (docs/reliability.md, LL reuse).
    __shared__ bool s_all;
    if (role.tid() == 0) {
        s_all = !buffer_timed_out(err);   // a token's wait already gave up: do not wait again
        for (int s = 0; s < kNumRanks && s_all; ++s)
            s_all = deepep::wait_geq(flags + s, seq, timeout_ns, err, kPhaseLLCombineRecv, s, rank);
    }
    role.sync();
    for (int t = role.tid(); t < shape.num_tokens; t += role.threads()) arrived[t] = 0;   // for operation seq + 2
    role.sync();
    if (role.tid() == 0) finish_receive(region, lay, seq_ptr, seq);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Kernels. Send and receive halves run as separate kernels with return_recv_hook; otherwise one
// fused kernel runs both. Fused dispatch: a block's receive phase starts as soon as its own sends are
// done. Fused combine: `reduce_warps` warps of every block reduce while the others send (0: every
// warp sends, then reduces). A waiting block never holds up a peer: what a peer waits for depends
// only on its own sends and ours, and our sender warps never wait.
// `guard` (set by the host after two operations were in flight): wait until every peer has
// received the operation that last used this half before writing into it. Each kernel takes one
// by-value struct (low_latency_params.cuh).
extern "C" __global__ void __launch_bounds__(512, 1) ll_dispatch_send(const LLDispatchSendParams p) {
    dispatch_send_body(p, p.seq, p.done);
}

extern "C" __global__ void __launch_bounds__(512, 1) ll_dispatch_recv(const LLDispatchRecvParams p) {
    dispatch_recv_body(p, p.seq, p.done);
}

// p.seq: both counters {sent, received}; p.done: {send phase, receive phase}
extern "C" __global__ void __launch_bounds__(512, 1) ll_dispatch(const LLDispatchParams p) {
    dispatch_send_body(p, p.seq, p.done);
    dispatch_recv_body(p, p.seq + 1, p.done + 1);
}

// The combine kernels pass their fields to the roles (inputs the roles index as ReadOnly).
extern "C" __global__ void __launch_bounds__(512, 1) ll_combine_send(const LLCombineSendParams p) {
    const LLLayout lay = *p.layout;
    const LLShape shape = shape_of(p);
    const int rank = static_cast<int>(p.rank);
    const ReadOnly<uint64_t> peer_regions{p.peer_regions};
    const uint64_t seq = next_seq(p.seq);
    __shared__ CombineShared sh;
    combine_send_prologue(sh, peer_regions, ReadOnly<int>{p.src_tokens}, p.region, lay, seq, rank,
                          static_cast<int>(p.guard), p.timeout_ns, p.err);
    const Role all{0, static_cast<int>(blockDim.x) / kWarpSize, 1};
    combine_send_role(all, sh, p.x, p.combine_slot, shape, lay, p.region, put_ranks(peer_regions), rank, seq, p.seq,
                      p.done, static_cast<int>(p.use_tma), p.err);
}

extern "C" __global__ void __launch_bounds__(256) ll_combine_recv(const LLCombineRecvParams p) {
    const LLLayout lay = *p.layout;
    const LLShape shape = shape_of(p);
    const uint64_t seq = next_seq(p.seq);
    __shared__ bool s_last;
    const Role all{0, static_cast<int>(blockDim.x) / kWarpSize, 1};
    combine_recv_role(all, &s_last, ReadOnly<int64_t>{p.topk_idx}, ReadOnly<float>{p.topk_weights}, p.out,
                      ReadOnly<int>{p.topk_slots}, shape, lay, p.region, static_cast<int>(p.rank), seq, p.seq, p.done,
                      p.timeout_ns, p.err);
}

// p.seq: both counters {sent, received}; p.done: {send phase, receive phase}
extern "C" __global__ void __launch_bounds__(512, 1) ll_combine(const LLCombineParams p) {
    const LLLayout lay = *p.layout;
    const LLShape shape = shape_of(p);
    const int rank = static_cast<int>(p.rank), reduce_warps = static_cast<int>(p.reduce_warps);
    const int use_tma = static_cast<int>(p.use_tma);
    const ReadOnly<uint64_t> peer_regions{p.peer_regions};
    const ReadOnly<int64_t> topk_idx{p.topk_idx};
    const ReadOnly<float> topk_weights{p.topk_weights};
    const ReadOnly<int> topk_slots{p.topk_slots};
    const uint64_t send_seq = next_seq(p.seq), recv_seq = next_seq(p.seq + 1);
    __shared__ CombineShared sh;
    combine_send_prologue(sh, peer_regions, ReadOnly<int>{p.src_tokens}, p.region, lay, send_seq, rank,
                          static_cast<int>(p.guard), p.timeout_ns, p.err);
    const unsigned int put_mask = put_ranks(peer_regions);
    const int warps = static_cast<int>(blockDim.x) / kWarpSize, warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (reduce_warps <= 0 || reduce_warps >= warps) {
        const Role all{0, warps, 1};
        combine_send_role(all, sh, p.x, p.combine_slot, shape, lay, p.region, put_mask, rank, send_seq, p.seq, p.done,
                          use_tma, p.err);
        combine_recv_role(all, &sh.last_recv, topk_idx, topk_weights, p.out, topk_slots, shape, lay, p.region, rank,
                          recv_seq, p.seq + 1, p.done + 1, p.timeout_ns, p.err);
    } else if (warp < warps - reduce_warps) {
        const Role senders{0, warps - reduce_warps, 1};
        combine_send_role(senders, sh, p.x, p.combine_slot, shape, lay, p.region, put_mask, rank, send_seq, p.seq,
                          p.done, use_tma, p.err);
    } else {
        const Role reducers{warps - reduce_warps, reduce_warps, 2};
        combine_recv_role(reducers, &sh.last_recv, topk_idx, topk_weights, p.out, topk_slots, shape, lay, p.region,
                          rank, recv_seq, p.seq + 1, p.done + 1, p.timeout_ns, p.err);
    }
}
