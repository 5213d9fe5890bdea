// Low-latency dispatch and combine (decode). Design, buffer layout and protocol: docs/low_latency.md.
//
// Every rank's low-latency region (inside its symmetric buffer, same offsets on all ranks) has two
// halves; operation number `seq` (1, 2, ... counted alike on every rank) uses half `seq & 1`:
//   recv_msgs      [R sources][M tokens][msg_bytes]   one message per (source token, this rank)
//   recv_meta      [R sources][meta_ints] int32       {num_tokens, entries per local expert [L]}
//   recv_flags     [R sources] uint64                 raised to seq after the source's messages
//   combine_rows   [M tokens][K slots][H] bf16        expert outputs for this rank's tokens
//   combine_flags  [R sources] uint64
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
#include "common/utils.cuh"

#ifndef DEEPEP_NUM_RANKS
#error "DEEPEP_NUM_RANKS must be defined"
#endif

namespace {

constexpr int kNumRanks = DEEPEP_NUM_RANKS;
// destination sets are 32-bit masks; more ranks need the internode low-latency design
static_assert(kNumRanks >= 1 && kNumRanks <= 32, "low-latency kernels support up to 32 ranks");
constexpr int kWarpSize = 32;
constexpr int kHeaderBytes = 16;
constexpr int kMaxTopk = 16;              // deepep_cupy.low_latency.MAX_TOPK
constexpr int kMaxExperts = 1024;         // deepep_cupy.low_latency.MAX_EXPERTS
constexpr unsigned int kFullMask = 0xffffffffu;

constexpr int kPhaseLLDispatchRecv = 20;  // names in deepep_cupy/kernel_errors.py
constexpr int kPhaseLLCombineRecv = 21;
constexpr int kPhaseLLTooMany = 22;
constexpr int kPhaseLLReuse = 23;

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
    int msg_bytes;
    int meta_ints;
    int max_tokens;   // M
    int max_topk;     // K the combine rows were sized for
};

struct LLShape {
    int num_tokens, hidden, num_topk, num_experts;   // T (this rank), H, K, E
    int use_fp8, round_scale, use_ue8m0;
};

// kernels take the shape as scalars (a launch argument cannot be a struct from CuPy)
#define LL_SHAPE_PARAMS int num_tokens_, int hidden_, int num_topk_, int num_experts_, int use_fp8_, \
                        int round_scale_, int use_ue8m0_
#define LL_SHAPE const LLShape shape{num_tokens_, hidden_, num_topk_, num_experts_, use_fp8_, round_scale_, use_ue8m0_}

// header + ids + slots, padded to 16 bytes: where the payload starts
DEEPEP_DEVICE int ids_bytes(int num_topk) { return (kHeaderBytes + 8 * num_topk + 15) / 16 * 16; }

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

// Last block of the grid to call this (after its own work) gets true; the counter is left zero.
// kPublish: the last block will release other blocks' stores to peers, so each block fences its
// own stores at system scope first; receive kernels only need the count.
template <bool kPublish>
DEEPEP_DEVICE bool last_block_done(unsigned int* counter) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (kPublish) __threadfence_system();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
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
DEEPEP_DEVICE unsigned int put_ranks(const uint64_t* peer_regions) {
    unsigned int m = 0;
    for (int r = 0; r < kNumRanks; ++r) m |= peer_regions[r] == 0 ? (1u << r) : 0u;
    return m;
}

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
                : nvshmem_uint64_g(reinterpret_cast<const uint64_t*>(region + lay.control), r);
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

// The receive half's last block: publish the operation count (peers' guards read it) and advance.
DEEPEP_DEVICE void finish_receive(uint8_t* region, const LLLayout& lay, uint64_t* seq_ptr, uint64_t seq) {
    *seq_ptr = seq;
    st_release_u64(reinterpret_cast<uint64_t*>(region + lay.control), seq);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// dispatch send: a block per token (grid-stride). The block first ranks its token's K entries among
// this rank's entries for the same expert in (t, k) order (a ballot scan over the entries before
// them: deterministic, no prepare kernel) and adds them to the per-expert counts. Warp 0 builds the
// header in shared memory and the destination mask; then every thread produces 16-byte chunks of
// the message (a header chunk, bf16 channels, or 16 channels cast to fp8 with their 128-channel
// group's scale) and stores each chunk to every NVLink destination and, when a destination needs
// puts, to the staging message, which warp r then puts to rank r. The last block writes every
// destination's meta (and zeroes the counts) and raises its flag. An expert chosen more than M
// times by this rank (only duplicates in a row can do that) keeps M entries and reports.
DEEPEP_DEVICE void dispatch_send_body(const unsigned short* __restrict__ x, const int64_t* __restrict__ topk_idx,
                 int* __restrict__ counts, int* __restrict__ topk_slots, LL_SHAPE_PARAMS, uint8_t* region,
                 const uint64_t* __restrict__ peer_regions, const LLLayout* lay_ptr, int rank, int guard,
                 uint64_t timeout_ns, uint64_t* seq_ptr, unsigned int* done_counter, deepep::ErrorRecord* err) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
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
    if (threadIdx.x < kNumRanks) s_peers[threadIdx.x] = peer_regions[threadIdx.x];
    __syncthreads();
    if (guard) wait_peers_received(region, s_peers, lay, seq, timeout_ns, err, rank);

    for (int t = blockIdx.x; t < shape.num_tokens; t += gridDim.x) {
        const long long first = static_cast<long long>(t) * K;
        if (threadIdx.x < K) {
            s_expert[threadIdx.x] = static_cast<int>(topk_idx[first + threadIdx.x]);
            s_before[threadIdx.x] = 0;
        }
        __syncthreads();
        // count entries j < first + k with the same expert; warp-aggregated shared atomics
        const int span = static_cast<int>(first) + K;
        for (int j0 = warp * kWarpSize; j0 < span; j0 += blockDim.x) {
            const int j = j0 + lane;
            const int e = j < span ? static_cast<int>(topk_idx[j]) : -1;
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
    if (!last_block_done<true>(done_counter)) return;   // the caller continues (fused kernels)
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
// expert l is local. The last block advances the receive counter.
DEEPEP_DEVICE void dispatch_recv_body(uint8_t* __restrict__ recv_x, uint8_t* __restrict__ recv_scales,
                 int* __restrict__ recv_count, int* __restrict__ recv_src_info, int* __restrict__ recv_src_k,
                 int* __restrict__ layout_begin, int* __restrict__ layout_count, LL_SHAPE_PARAMS,
                 uint8_t* region, const LLLayout* lay_ptr, int rank, uint64_t* seq_ptr,
                 unsigned int* done_counter, uint64_t timeout_ns, deepep::ErrorRecord* err) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
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
    if (threadIdx.x < kNumRanks) s_tokens[threadIdx.x] = ok ? __ldcg(metas + threadIdx.x * lay.meta_ints) : 0;
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
            if (__ldcg(header + 1) != static_cast<int>(seq & 0x7fffffff)) continue;   // not sent to me
            const int e = __ldcg(header + 4 + k), slot = __ldcg(header + 4 + K + k);
            if (e < expert_lo || e >= expert_lo + num_local || slot < 0) continue;
            const int l = e - expert_lo;
            const long long pos = static_cast<long long>(l) * slot_stride + s_begin[l * kNumRanks + s] + slot;
            warp_copy16<8>(recv_x + pos * data_bytes, msg + payload, data_bytes, lane);
            for (int i = lane; i < scale_bytes / 4; i += kWarpSize)
                reinterpret_cast<int*>(recv_scales + pos * scale_bytes)[i] =
                    __ldcg(reinterpret_cast<const int*>(msg + payload + data_bytes) + i);
            if (lane == 0) {
                recv_src_info[pos] = __ldcg(header);
                recv_src_k[pos] = k;
            }
        }
    }
    if (last_block_done<false>(done_counter) && threadIdx.x == 0) finish_receive(region, lay, seq_ptr, seq);
}

// ------------------------------------------------------------------------------------------------
// combine send: every received slot (l, pos < recv_count[l]) from another rank s goes back to s as
// combine_rows[t][k] (t, k from the dispatch handle); slots from this rank stay where they are (the
// receive reads them from x in place). The remote rows are numbered across the local experts (a
// prefix in shared memory) and cut into 1, 2 or 4 parts so that every warp of the grid has a
// similar share. NVLink peers: direct stores; others: the part is staged at
// combine_stage[s][t*K + k] and put. The last block raises every source's flag.
DEEPEP_DEVICE void combine_send_body(const unsigned short* __restrict__ x, const int* __restrict__ recv_count,
                const int* __restrict__ recv_src_info, const int* __restrict__ recv_src_k,
                const int* __restrict__ layout_begin, const int* __restrict__ layout_count, LL_SHAPE_PARAMS,
                uint8_t* region, const uint64_t* __restrict__ peer_regions, const LLLayout* lay_ptr,
                int rank, int guard, uint64_t timeout_ns, deepep::ErrorRecord* err, uint64_t* seq_ptr,
                unsigned int* done_counter) {
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
    const uint64_t seq = next_seq(seq_ptr);
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int H = shape.hidden, K = lay.max_topk, M = lay.max_tokens;
    const int num_local = shape.num_experts / kNumRanks;
    const int slot_stride = kNumRanks * M;
    const long long half_off = static_cast<long long>(seq & 1) * lay.half_bytes;
    const unsigned int put_mask = put_ranks(peer_regions);
    const int gwarp = blockIdx.x * num_warps + warp, gwarps = gridDim.x * num_warps;

    __shared__ uint64_t s_peers[kNumRanks];
    __shared__ int s_row_begin[kMaxExperts + 1];   // first remote row of each local expert
    if (threadIdx.x < kNumRanks) s_peers[threadIdx.x] = peer_regions[threadIdx.x];
    if (warp == 0) {
        int carry = 0;
        for (int base = 0; base < num_local; base += kWarpSize) {
            const int l = base + lane;
            int v = l < num_local ? recv_count[l] - layout_count[l * kNumRanks + rank] : 0;
#pragma unroll
            for (int o = 1; o < kWarpSize; o <<= 1) {
                const int u = __shfl_up_sync(kFullMask, v, o);
                if (lane >= o) v += u;
            }
            if (l < num_local) s_row_begin[l + 1] = carry + v;
            carry += __shfl_sync(kFullMask, v, kWarpSize - 1);
        }
        if (lane == 0) s_row_begin[0] = 0;
    }
    __syncthreads();
    if (guard) wait_peers_received(region, s_peers, lay, seq, timeout_ns, err, rank);
    const int rows = s_row_begin[num_local];
    const int share = gwarps / max(rows, 1);
    const int parts = share >= 4 ? 4 : (share >= 2 ? 2 : 1);   // 1, 2 or 4: H * 2 / parts stays a multiple of 16
    const int part_bytes = H * 2 / parts;
    for (int item = gwarp; item < rows * parts; item += gwarps) {
        const int r = item / parts, part = item % parts;
        int lo = 0, hi = num_local;                     // last l with s_row_begin[l] <= r
        while (hi - lo > 1) {
            const int mid = (lo + hi) / 2;
            if (s_row_begin[mid] <= r) lo = mid;
            else hi = mid;
        }
        const int l = lo;
        int pos = r - s_row_begin[l];                   // skip this rank's own block of slots
        const int own_begin = layout_begin[l * kNumRanks + rank];
        if (pos >= own_begin) pos += layout_count[l * kNumRanks + rank];
        int s = 0;
        while (s + 1 < kNumRanks && pos >= layout_begin[l * kNumRanks + s + 1]) ++s;
        const long long slot = static_cast<long long>(l) * slot_stride + pos;
        const int t = recv_src_info[slot], k = recv_src_k[slot];
        const uint8_t* src = reinterpret_cast<const uint8_t*>(x + slot * H) + part * part_bytes;
        const long long dst_off = half_off + lay.combine_rows + (static_cast<long long>(t) * K + k) * H * 2 +
                                  part * part_bytes;
        const uint64_t peer = s_peers[s];
        if (peer != 0) {
            warp_copy16<8>(reinterpret_cast<uint8_t*>(peer) + dst_off, src, part_bytes, lane);
        } else {
            uint8_t* stage = region + half_off + lay.combine_stage +
                             (static_cast<long long>(s) * M * K + static_cast<long long>(t) * K + k) * H * 2 +
                             part * part_bytes;
            warp_copy16<8>(stage, src, part_bytes, lane);
            __syncwarp();
            nvshmemx_putmem_nbi_warp(region + dst_off, stage, part_bytes, s);
        }
    }
    if (put_mask && threadIdx.x == 0) nvshmem_quiet();
    if (!last_block_done<true>(done_counter)) return;   // the caller continues (fused kernels)
    if (threadIdx.x < kNumRanks) {
        const int s = threadIdx.x;
        const long long flag_off = half_off + lay.combine_flags + static_cast<long long>(rank) * 8;
        const uint64_t peer = peer_regions[s];
        if (peer != 0) {
            __threadfence_system();
            st_release_u64(reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(peer) + flag_off), seq);
        } else {
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(region + flag_off), seq, NVSHMEM_SIGNAL_SET, s);
        }
    }
    if (threadIdx.x == 0) *seq_ptr = seq;
}

// ------------------------------------------------------------------------------------------------
// combine receive: wait for every rank's flag, then a thread per (token, 8 channels) sums
// w[t,k] * row[t][k] over valid k in ascending order (float32, round once to bf16), with up to 8
// rows' loads in flight. Rows of this rank's own experts are read from x in place (slot from the
// dispatch's topk_slots), the others from combine_rows. The last block advances the receive counter.
DEEPEP_DEVICE void combine_recv_body(const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                unsigned short* __restrict__ out, const unsigned short* __restrict__ x,
                const int* __restrict__ layout_begin, const int* __restrict__ topk_slots, LL_SHAPE_PARAMS,
                uint8_t* region, const LLLayout* lay_ptr, int rank, uint64_t* seq_ptr, unsigned int* done_counter,
                uint64_t timeout_ns, deepep::ErrorRecord* err) {
    constexpr int kLoads = 8;   // rows in flight per thread
    const LLLayout lay = *lay_ptr;
    LL_SHAPE;
    const uint64_t seq = next_seq(seq_ptr);
    const int H = shape.hidden, K = shape.num_topk, KMAX = lay.max_topk;
    const int num_local = shape.num_experts / kNumRanks, expert_lo = rank * num_local;
    const long long slot_stride = static_cast<long long>(kNumRanks) * lay.max_tokens;
    uint8_t* half = region + static_cast<long long>(seq & 1) * lay.half_bytes;
    const bool ok = block_wait_all(reinterpret_cast<uint64_t*>(half + lay.combine_flags), seq, timeout_ns, err,
                                   kPhaseLLCombineRecv, rank);
    if (ok) {
        const int4* rows = reinterpret_cast<const int4*>(half + lay.combine_rows);
        const int row_vecs = H / 8;
        const long long items = static_cast<long long>(shape.num_tokens) * row_vecs;
        for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < items;
             i += static_cast<long long>(gridDim.x) * blockDim.x) {
            const int t = static_cast<int>(i / row_vecs), h = static_cast<int>(i % row_vecs);
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int k0 = 0; k0 < K; k0 += kLoads) {
                int4 v[kLoads];
                float w[kLoads];
                bool on[kLoads];
#pragma unroll
                for (int u = 0; u < kLoads; ++u) {
                    const long long j = static_cast<long long>(t) * K + k0 + u;
                    on[u] = k0 + u < K && topk_idx[j] >= 0;
                    w[u] = on[u] ? topk_weights[j] : 0.0f;
                    if (!on[u]) {
                        v[u] = make_int4(0, 0, 0, 0);
                        continue;
                    }
                    const int l = static_cast<int>(topk_idx[j]) - expert_lo;
                    if (l >= 0 && l < num_local) {   // this rank's own expert: its output row, in place
                        const int slot = topk_slots[j];   // -1: dropped (reported by the dispatch)
                        v[u] = slot < 0 ? make_int4(0, 0, 0, 0)
                                        : __ldg(reinterpret_cast<const int4*>(x) +
                                                (static_cast<long long>(l) * slot_stride +
                                                 layout_begin[l * kNumRanks + rank] + slot) * row_vecs + h);
                    } else
                        v[u] = __ldcg(rows + (static_cast<long long>(t) * KMAX + k0 + u) * row_vecs + h);
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
    }
    if (last_block_done<false>(done_counter) && threadIdx.x == 0) finish_receive(region, lay, seq_ptr, seq);
}

// ------------------------------------------------------------------------------------------------
// Kernels. Send and receive halves run as separate kernels with return_recv_hook; otherwise one
// fused kernel runs both (the receive phase of a block starts as soon as its own sends are done,
// and one launch is saved). A fused block that waits never holds up a peer: a peer's flags depend
// only on that peer's own sends, so the wait ends even if some of our blocks are not yet resident.
// `guard` (set by the host after two operations were in flight): wait until every peer has
// received the operation that last used this half before writing into it.
#define LL_DISPATCH_SEND_PARAMS const unsigned short* __restrict__ x, const int64_t* __restrict__ topk_idx, \
    int* __restrict__ counts, int* __restrict__ topk_slots, LL_SHAPE_PARAMS, uint8_t* region, \
    const uint64_t* __restrict__ peer_regions, const LLLayout* lay_ptr, int rank, int guard, uint64_t timeout_ns, \
    uint64_t* seq_ptr, unsigned int* done_counter, deepep::ErrorRecord* err
#define LL_DISPATCH_SEND_ARGS x, topk_idx, counts, topk_slots, num_tokens_, hidden_, num_topk_, num_experts_, \
    use_fp8_, round_scale_, use_ue8m0_, region, peer_regions, lay_ptr, rank, guard, timeout_ns
#define LL_DISPATCH_RECV_PARAMS uint8_t* __restrict__ recv_x, uint8_t* __restrict__ recv_scales, \
    int* __restrict__ recv_count, int* __restrict__ recv_src_info, int* __restrict__ recv_src_k, \
    int* __restrict__ layout_begin, int* __restrict__ layout_count
#define LL_DISPATCH_RECV_ARGS recv_x, recv_scales, recv_count, recv_src_info, recv_src_k, layout_begin, \
    layout_count, num_tokens_, hidden_, num_topk_, num_experts_, use_fp8_, round_scale_, use_ue8m0_, region, \
    lay_ptr, rank

extern "C" __global__ void __launch_bounds__(512, 1) ll_dispatch_send(LL_DISPATCH_SEND_PARAMS) {
    dispatch_send_body(LL_DISPATCH_SEND_ARGS, seq_ptr, done_counter, err);
}

extern "C" __global__ void __launch_bounds__(512, 1)
ll_dispatch_recv(LL_DISPATCH_RECV_PARAMS, LL_SHAPE_PARAMS, uint8_t* region, const LLLayout* lay_ptr, int rank,
                 uint64_t timeout_ns, uint64_t* seq_ptr, unsigned int* done_counter, deepep::ErrorRecord* err) {
    dispatch_recv_body(LL_DISPATCH_RECV_ARGS, seq_ptr, done_counter, timeout_ns, err);
}

// seq_ptr: both counters {sent, received}; done_counter: {send phase, receive phase}
extern "C" __global__ void __launch_bounds__(512, 1)
ll_dispatch(LL_DISPATCH_SEND_PARAMS, LL_DISPATCH_RECV_PARAMS) {
    dispatch_send_body(LL_DISPATCH_SEND_ARGS, seq_ptr, done_counter, err);
    dispatch_recv_body(LL_DISPATCH_RECV_ARGS, seq_ptr + 1, done_counter + 1, timeout_ns, err);
}

#define LL_COMBINE_SEND_PARAMS const unsigned short* __restrict__ x, const int* __restrict__ recv_count, \
    const int* __restrict__ recv_src_info, const int* __restrict__ recv_src_k, \
    const int* __restrict__ layout_begin, const int* __restrict__ layout_count, LL_SHAPE_PARAMS, \
    uint8_t* region, const uint64_t* __restrict__ peer_regions, const LLLayout* lay_ptr, int rank, int guard, \
    uint64_t timeout_ns, deepep::ErrorRecord* err, uint64_t* seq_ptr, unsigned int* done_counter
#define LL_COMBINE_SEND_ARGS x, recv_count, recv_src_info, recv_src_k, layout_begin, layout_count, num_tokens_, \
    hidden_, num_topk_, num_experts_, use_fp8_, round_scale_, use_ue8m0_, region, peer_regions, lay_ptr, rank, \
    guard, timeout_ns, err
#define LL_COMBINE_RECV_PARAMS const int64_t* __restrict__ topk_idx, const float* __restrict__ topk_weights, \
    unsigned short* __restrict__ out, const int* __restrict__ topk_slots
#define LL_COMBINE_RECV_ARGS topk_idx, topk_weights, out, x, layout_begin, topk_slots, num_tokens_, hidden_, \
    num_topk_, num_experts_, use_fp8_, round_scale_, use_ue8m0_, region, lay_ptr, rank

extern "C" __global__ void __launch_bounds__(512, 1) ll_combine_send(LL_COMBINE_SEND_PARAMS) {
    combine_send_body(LL_COMBINE_SEND_ARGS, seq_ptr, done_counter);
}

// the receive half reads x (own rows) and layout_begin as well: x must stay unchanged until it runs
extern "C" __global__ void __launch_bounds__(256)
ll_combine_recv(LL_COMBINE_RECV_PARAMS, const unsigned short* __restrict__ x, const int* __restrict__ layout_begin,
                LL_SHAPE_PARAMS, uint8_t* region, const LLLayout* lay_ptr, int rank, uint64_t timeout_ns,
                deepep::ErrorRecord* err, uint64_t* seq_ptr, unsigned int* done_counter) {
    combine_recv_body(LL_COMBINE_RECV_ARGS, seq_ptr, done_counter, timeout_ns, err);
}

extern "C" __global__ void __launch_bounds__(512, 1)
ll_combine(LL_COMBINE_SEND_PARAMS, LL_COMBINE_RECV_PARAMS) {
    combine_send_body(LL_COMBINE_SEND_ARGS, seq_ptr, done_counter);
    combine_recv_body(LL_COMBINE_RECV_ARGS, seq_ptr + 1, done_counter + 1, timeout_ns, err);
}
