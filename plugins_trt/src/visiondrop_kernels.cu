// VisionDrop select / merge kernels: the batched CUDA form of visiondrop/pruning.py's
// `select` and `merge`. See include/visiondrop_kernels.h for the C ABI.
//
// select = 2 launches: a per-batch-row ranking kernel (sort in shared memory + scan), then a
//          wide row-gather kernel (one block per output row, 16-byte copies when aligned).
// merge  = 2 launches: a target-assignment kernel (cosine argmax, targets in shared memory; it
//          also writes the optional per-member `assignment` output), then an accumulate kernel
//          (one block per target and D slice, members summed in ascending row order:
//          deterministic, no float atomics).

#include "visiondrop_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace {

// ---------------------------------------------------------------- dtype helpers

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// V consecutive elements moved as one aligned load/store.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
    T v[V];
};

__device__ __forceinline__ float warp_sum(float v) {
    // Butterfly: every lane ends with the same, order-fixed sum (float add is commutative).
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// ---------------------------------------------------------------- select

// Tie rule. The reference ranks token i by rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i} and
// keeps rank_i < k. We sort the 64-bit keys (score descending, index ascending): keys are
// unique (the index is in them), so the sorted position of i is exactly rank_i, whatever the
// sort algorithm. -0.0 is folded into +0.0 so that the two tie (they compare equal in torch);
// +inf sorts first (the vision stage's CLS token). NaN scores are unspecified, as in the reference.
__device__ __forceinline__ uint64_t select_key(float score, int index) {
    if (score == 0.0f) score = 0.0f;
    const uint32_t bits = __float_as_uint(score);
    const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // monotone in score
    return (uint64_t(~ascending) << 32) | uint32_t(index);
}

// One block per batch row: bitonic sort of P = pow2 >= N keys in shared memory, mark the first
// k sorted tokens as kept, then a block scan in index order writes both index lists ascending.
__global__ void select_rank_kernel(const float* __restrict__ scores, int32_t* __restrict__ kept_index,
                                   int32_t* __restrict__ rest_index, int N, int k, int P) {
    extern __shared__ uint64_t keys[];                                       // P sort keys
    unsigned char* kept = reinterpret_cast<unsigned char*>(keys + P);       // N flags, index order
    __shared__ int warp_offsets[32];
    const int b = blockIdx.x;
    const float* row = scores + size_t(b) * N;

    for (int i = threadIdx.x; i < P; i += blockDim.x) keys[i] = i < N ? select_key(row[i], i) : ~0ull;
    __syncthreads();
    for (int size = 2; size <= P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < P / 2; t += blockDim.x) {
                const int i = 2 * t - (t & (stride - 1));  // first element of pair t
                const int j = i + stride;
                const bool ascending = (i & size) == 0;
                const uint64_t a = keys[i], c = keys[j];
                if ((a > c) == ascending) {
                    keys[i] = c;
                    keys[j] = a;
                }
            }
            __syncthreads();
        }
    }
    for (int p = threadIdx.x; p < N; p += blockDim.x) kept[uint32_t(keys[p])] = p < k;
    __syncthreads();

    // Each thread owns a contiguous index range; an exclusive scan of kept counts gives where
    // its indices land in kept_index / rest_index.
    const int per_thread = (N + blockDim.x - 1) / blockDim.x;
    const int begin = min(N, int(threadIdx.x) * per_thread), end = min(N, begin + per_thread);
    int local = 0;
    for (int i = begin; i < end; ++i) local += kept[i];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inclusive = local;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += v;
    }
    if (lane == 31) warp_offsets[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int total = lane < int(blockDim.x >> 5) ? warp_offsets[lane] : 0;
        int scan = total;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, scan, offset);
            if (lane >= offset) scan += v;
        }
        warp_offsets[lane] = scan - total;
    }
    __syncthreads();
    int kept_before = warp_offsets[warp] + inclusive - local;
    int32_t* kept_out = kept_index + size_t(b) * k;
    int32_t* rest_out = rest_index + size_t(b) * (N - k);
    for (int i = begin; i < end; ++i) {
        if (kept[i])
            kept_out[kept_before++] = i;
        else
            rest_out[i - kept_before] = i;
    }
}

constexpr int kCopyBatch = 4;  // loads issued before the matching stores

template <typename U> __device__ __forceinline__ void copy_units(char* dst, const char* src, size_t bytes) {
    const U* s = reinterpret_cast<const U*>(src);
    U* d = reinterpret_cast<U*>(dst);
    const size_t n = bytes / sizeof(U);
    for (size_t first = threadIdx.x; first < n; first += kCopyBatch * blockDim.x) {
        U v[kCopyBatch];
#pragma unroll
        for (int u = 0; u < kCopyBatch; ++u)
            if (first + u * blockDim.x < n) v[u] = s[first + u * blockDim.x];
#pragma unroll
        for (int u = 0; u < kCopyBatch; ++u)
            if (first + u * blockDim.x < n) d[first + u * blockDim.x] = v[u];
    }
}

// Block-wide copy of one row in `unit`-byte pieces (unit divides bytes and both addresses).
__device__ __forceinline__ void copy_row(char* dst, const char* src, size_t bytes, int unit) {
    switch (unit) {
    case 16: copy_units<uint4>(dst, src, bytes); break;
    case 8: copy_units<uint2>(dst, src, bytes); break;
    case 4: copy_units<uint32_t>(dst, src, bytes); break;
    case 2: copy_units<uint16_t>(dst, src, bytes); break;
    default: copy_units<uint8_t>(dst, src, bytes); break;
    }
}

// One block per output row (B*N of them): kept rows to `dominant`, the others to `rest_tokens`
// plus their metric rows. Pure copies, so the outputs are bit-exact gathers.
__global__ void select_gather_kernel(const char* __restrict__ tokens, const char* __restrict__ metric,
                                     const int32_t* __restrict__ kept_index, const int32_t* __restrict__ rest_index,
                                     char* __restrict__ dominant, char* __restrict__ rest_tokens,
                                     char* __restrict__ rest_metric, int N, int k, size_t token_bytes,
                                     size_t metric_bytes, int token_unit, int metric_unit) {
    const int b = blockIdx.x / N, p = blockIdx.x % N;
    const size_t batch_row = size_t(b) * N;
    if (p < k) {
        const size_t out = size_t(b) * k + p;
        const int src = kept_index[out];
        copy_row(dominant + out * token_bytes, tokens + (batch_row + src) * token_bytes, token_bytes, token_unit);
    } else {
        const size_t out = size_t(b) * (N - k) + (p - k);
        const int src = rest_index[out];
        copy_row(rest_tokens + out * token_bytes, tokens + (batch_row + src) * token_bytes, token_bytes, token_unit);
        copy_row(rest_metric + out * metric_bytes, metric + (batch_row + src) * metric_bytes, metric_bytes,
                 metric_unit);
    }
}

// ---------------------------------------------------------------- merge

constexpr int kAssignWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kAssignWarps * kRowsPerWarp;
constexpr int kLaneValues = VD_MAX_METRIC / 32;  // metric dims held per lane
constexpr int kTargetChunkFloats = 8192;         // 32 KiB of normalised target rows in shared memory
constexpr int kAccumulateThreads = 128;
constexpr int kLoadsInFlight = 8;                // member rows loaded before they are added

// Lane-distributed row (dim = lane + 32 i), normalised as l2_normalize: x / ||x||, fp32, no epsilon.
__device__ __forceinline__ void load_normalised(const float* __restrict__ row, int M, int lane,
                                                float (&v)[kLaneValues]) {
    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < kLaneValues; ++i) {
        const int d = lane + 32 * i;
        v[i] = d < M ? row[d] : 0.0f;
        squares = fmaf(v[i], v[i], squares);
    }
    const float norm = sqrtf(warp_sum(squares));
#pragma unroll
    for (int i = 0; i < kLaneValues; ++i) v[i] = lane + 32 * i < M ? v[i] / norm : 0.0f;
}

__device__ __forceinline__ bool is_target(int r, int stride, int c) { return r % stride == 0 && r / stride < c; }

// assign[b, r] = the target (0..c-1) of highest cosine similarity for each member row r, -1 for
// targets; the same target ids also go to assignment[b, m] (nullable), m the member's rank among
// the R - c members in ascending row order (pruning.member_positions). A warp owns kRowsPerWarp member rows in registers; targets stream through shared
// memory in chunks. Targets are visited in ascending order and only a strictly greater
// similarity replaces the best, so the first target wins ties; NaN counts as the maximum
// (first NaN wins), which is torch.argmax's rule.
__global__ void merge_assign_kernel(const float* __restrict__ metric, int32_t* __restrict__ assign,
                                    int32_t* __restrict__ assignment, int R, int M, int c, int stride,
                                    int tiles_per_batch, int chunk) {
    extern __shared__ float target_rows[];  // chunk x M, normalised
    const int b = blockIdx.x / tiles_per_batch, tile = blockIdx.x % tiles_per_batch;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* rows = metric + size_t(b) * R * M;

    int row_index[kRowsPerWarp];
    bool member[kRowsPerWarp];
    float v[kRowsPerWarp][kLaneValues];
    float best[kRowsPerWarp];
    int best_target[kRowsPerWarp];
    bool best_is_nan[kRowsPerWarp];
    bool any_member = false;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
        const int r = tile * kRowsPerBlock + warp * kRowsPerWarp + q;
        row_index[q] = r;
        member[q] = r < R && !is_target(r, stride, c);
        any_member |= member[q];
        if (member[q]) load_normalised(rows + size_t(r) * M, M, lane, v[q]);
        best[q] = -INFINITY;
        best_target[q] = 0;
        best_is_nan[q] = false;
    }

    for (int t0 = 0; t0 < c; t0 += chunk) {
        const int n = min(chunk, c - t0);
        __syncthreads();  // the previous chunk is consumed
        for (int t = warp; t < n; t += kAssignWarps) {
            float w[kLaneValues];
            load_normalised(rows + size_t(t0 + t) * stride * M, M, lane, w);
#pragma unroll
            for (int i = 0; i < kLaneValues; ++i)
                if (lane + 32 * i < M) target_rows[t * M + lane + 32 * i] = w[i];
        }
        __syncthreads();
        if (!any_member) continue;
        for (int t = 0; t < n; ++t) {
            const float* target = target_rows + t * M;
#pragma unroll
            for (int q = 0; q < kRowsPerWarp; ++q) {
                float partial = 0.0f;
#pragma unroll
                for (int i = 0; i < kLaneValues; ++i)
                    if (lane + 32 * i < M) partial = fmaf(v[q][i], target[lane + 32 * i], partial);
                const float similarity = warp_sum(partial);
                const bool nan = similarity != similarity;
                if (!best_is_nan[q] && (nan || similarity > best[q])) {
                    best[q] = similarity;
                    best_target[q] = t0 + t;
                    best_is_nan[q] = nan;
                }
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int q = 0; q < kRowsPerWarp; ++q)
            if (row_index[q] < R) assign[size_t(b) * R + row_index[q]] = member[q] ? best_target[q] : -1;
        if (assignment) {
#pragma unroll
            for (int q = 0; q < kRowsPerWarp; ++q) {
                if (!member[q]) continue;
                const int r = row_index[q];
                const int targets_before = min(c, r / stride + 1);  // targets at rows <= r
                assignment[size_t(b) * (R - c) + (r - targets_before)] = best_target[q];
            }
        }
    }
}

// One block per (batch, target j) and slice of V * kAccumulateThreads columns. The block first
// lists target j's members in ascending row order (ballot compaction of assign[b, :]), then every
// thread adds those rows to its fp32 accumulators in that order: the result depends on the data
// only, not on scheduling. contextual = target + sum / max(1, count), then cast to T.
// (__launch_bounds__ with one block per SM lets ptxas keep all kLoadsInFlight loads outstanding;
// without it, it interleaves them with the adds to save registers and stalls on each load.)
template <typename T, int V>
__global__ void __launch_bounds__(kAccumulateThreads, 1)
    merge_accumulate_kernel(const T* __restrict__ tokens, const int32_t* __restrict__ assign,
                            T* __restrict__ contextual, int R, int D, int c, int stride) {
    __shared__ int members[VD_MAX_TOKENS];
    __shared__ int warp_counts[2][kAccumulateThreads / 32];  // double-buffered: one barrier per round
    const int b = blockIdx.x / c, j = blockIdx.x % c;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t* a = assign + size_t(b) * R;

    int count = 0;
    for (int base = 0, round = 0; base < R; base += kAccumulateThreads, round ^= 1) {
        const int r = base + threadIdx.x;
        const bool is_member = r < R && a[r] == j;
        const unsigned ballot = __ballot_sync(0xffffffffu, is_member);
        if (lane == 0) warp_counts[round][warp] = __popc(ballot);
        __syncthreads();
        int offset = count, total = 0;
#pragma unroll
        for (int w = 0; w < kAccumulateThreads / 32; ++w) {
            offset += w < warp ? warp_counts[round][w] : 0;
            total += warp_counts[round][w];
        }
        if (is_member) members[offset + __popc(ballot & ((1u << lane) - 1u))] = r;
        count += total;
    }
    __syncthreads();

    const int d0 = (blockIdx.y * kAccumulateThreads + threadIdx.x) * V;
    if (d0 >= D) return;
    const T* rows = tokens + size_t(b) * R * D + d0;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.0f;
    int m = 0;
    for (; m + kLoadsInFlight <= count; m += kLoadsInFlight) {  // loads overlap, adds keep member order
        Vec<T, V> x[kLoadsInFlight];
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u)
            x[u] = *reinterpret_cast<const Vec<T, V>*>(rows + size_t(members[m + u]) * D);
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += to_float(x[u].v[e]);
    }
    for (; m < count; ++m) {
        const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(rows + size_t(members[m]) * D);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += to_float(x.v[e]);
    }
    const float denominator = float(max(count, 1));
    const Vec<T, V> target = *reinterpret_cast<const Vec<T, V>*>(rows + size_t(j) * stride * D);
    Vec<T, V> result;
#pragma unroll
    for (int e = 0; e < V; ++e) result.v[e] = from_float<T>(to_float(target.v[e]) + acc[e] / denominator);
    *reinterpret_cast<Vec<T, V>*>(contextual + (size_t(b) * c + j) * D + d0) = result;
}

// ---------------------------------------------------------------- host helpers

// Largest power-of-two unit <= 16 dividing `bytes` and every address.
int copy_unit(size_t bytes, const void* a, const void* b, const void* c = nullptr) {
    const uintptr_t mix = uintptr_t(bytes) | uintptr_t(a) | uintptr_t(b) | uintptr_t(c);
    int unit = 16;
    while (unit > 1 && (mix & uintptr_t(unit - 1)) != 0) unit >>= 1;
    return unit;
}

bool aligned(const void* p, size_t alignment) { return uintptr_t(p) % alignment == 0; }

template <typename T>
int launch_accumulate(const void* tokens, const int32_t* assign, void* contextual, int B, int R, int D, int c,
                      int stride, cudaStream_t stream) {
    constexpr int V = 16 / sizeof(T);
    const dim3 block(kAccumulateThreads);
    if (D % V == 0 && aligned(tokens, 16) && aligned(contextual, 16)) {
        const dim3 grid(unsigned(B) * c, (D + V * kAccumulateThreads - 1) / (V * kAccumulateThreads));
        merge_accumulate_kernel<T, V><<<grid, block, 0, stream>>>(static_cast<const T*>(tokens), assign,
                                                                  static_cast<T*>(contextual), R, D, c, stride);
    } else {
        const dim3 grid(unsigned(B) * c, (D + kAccumulateThreads - 1) / kAccumulateThreads);
        merge_accumulate_kernel<T, 1><<<grid, block, 0, stream>>>(static_cast<const T*>(tokens), assign,
                                                                  static_cast<T*>(contextual), R, D, c, stride);
    }
    return int(cudaGetLastError());
}

size_t dtype_size(int dtype) { return dtype == VD_FLOAT32 ? 4 : 2; }

bool valid_dtype(int dtype) { return dtype == VD_FLOAT32 || dtype == VD_FLOAT16 || dtype == VD_BFLOAT16; }

}  // namespace

extern "C" {

VD_API size_t vd_select_workspace_size(int, int, int) { return 0; }

VD_API int vd_select(const float* scores, const void* tokens, const float* metric, void* dominant, void* rest_tokens,
                     float* rest_metric, int32_t* kept_index, int32_t* rest_index, int B, int N, int D, int M, int k,
                     int dtype, void*, void* stream_handle) {
    if (B < 0 || N < 1 || N > VD_MAX_TOKENS || k < 1 || k > N || D < 1 || M < 1 || !valid_dtype(dtype) ||
        int64_t(B) * N > INT_MAX)
        return int(cudaErrorInvalidValue);
    if (!scores || !tokens || !metric || !dominant || !kept_index ||
        (N > k && (!rest_tokens || !rest_metric || !rest_index)))
        return int(cudaErrorInvalidValue);
    if (B == 0) return 0;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);

    int P = 2;
    while (P < N) P <<= 1;
    const int threads = P / 2 < 32 ? 32 : (P / 2 > 1024 ? 1024 : P / 2);
    const size_t shared = size_t(P) * sizeof(uint64_t) + size_t(N);
    select_rank_kernel<<<B, threads, shared, stream>>>(scores, kept_index, rest_index, N, k, P);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return int(status);

    const size_t token_bytes = size_t(D) * dtype_size(dtype), metric_bytes = size_t(M) * sizeof(float);
    const int token_unit = copy_unit(token_bytes, tokens, dominant, rest_tokens);
    const int metric_unit = copy_unit(metric_bytes, metric, rest_metric);
    select_gather_kernel<<<B * N, 128, 0, stream>>>(
        static_cast<const char*>(tokens), reinterpret_cast<const char*>(metric), kept_index, rest_index,
        static_cast<char*>(dominant), static_cast<char*>(rest_tokens), reinterpret_cast<char*>(rest_metric), N, k,
        token_bytes, metric_bytes, token_unit, metric_unit);
    return int(cudaGetLastError());
}

VD_API size_t vd_merge_workspace_size(int B, int R, int) {
    const size_t bytes = size_t(B < 0 ? 0 : B) * size_t(R < 0 ? 0 : R) * sizeof(int32_t);
    return (bytes + 255) / 256 * 256;
}

VD_API int vd_merge(const void* rest_tokens, const float* rest_metric, void* contextual, int32_t* assignment, int B,
                    int R, int D, int M, int c, int dtype, void* workspace, void* stream_handle) {
    if (B < 0 || R < 1 || R > VD_MAX_TOKENS || c < 1 || c > R || D < 1 || M < 1 || M > VD_MAX_METRIC ||
        !valid_dtype(dtype) || int64_t(B) * c > INT_MAX || int64_t(B) * R > INT_MAX)
        return int(cudaErrorInvalidValue);
    if (B == 0) return 0;
    if (!rest_tokens || !rest_metric || !contextual || !workspace) return int(cudaErrorInvalidValue);
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    const int stride = R / c > 1 ? R / c : 1;
    int32_t* assign = static_cast<int32_t*>(workspace);

    const int tiles = (R + kRowsPerBlock - 1) / kRowsPerBlock;
    const int chunk = c < kTargetChunkFloats / M ? c : kTargetChunkFloats / M;
    const size_t shared = size_t(chunk) * M * sizeof(float);
    merge_assign_kernel<<<unsigned(B) * tiles, kAssignWarps * 32, shared, stream>>>(
        rest_metric, assign, R > c ? assignment : nullptr, R, M, c, stride, tiles, chunk);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return int(status);

    switch (dtype) {
    case VD_FLOAT32: return launch_accumulate<float>(rest_tokens, assign, contextual, B, R, D, c, stride, stream);
    case VD_FLOAT16: return launch_accumulate<__half>(rest_tokens, assign, contextual, B, R, D, c, stride, stream);
    default: return launch_accumulate<__nv_bfloat16>(rest_tokens, assign, contextual, B, R, D, c, stride, stream);
    }
}

}  // extern "C"
