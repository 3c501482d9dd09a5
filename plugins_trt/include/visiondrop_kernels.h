/* VisionDrop select / merge CUDA kernels behind a small C ABI (no TensorRT dependency).
 *
 * Semantics are those of visiondrop/pruning.py: `select` and `merge`. Every function only
 * enqueues work on `stream` (a cudaStream_t passed as void*): no host synchronisation and no
 * allocation; scratch memory comes from the caller's `workspace`. Return value: 0 on success,
 * else a cudaError_t code (cudaErrorInvalidValue = 1 for bad arguments).
 *
 * Token dtype codes: VD_FLOAT32 = 0, VD_FLOAT16 = 1, VD_BFLOAT16 = 2. Scores and metrics are
 * float32, indices int32. All tensors are dense row-major (contiguous).
 */
#ifndef VISIONDROP_KERNELS_H
#define VISIONDROP_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define VD_API __declspec(dllexport)
#else
#define VD_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum { VD_FLOAT32 = 0, VD_FLOAT16 = 1, VD_BFLOAT16 = 2 };

/* Size limits of the kernels (shared-memory sort / register-held metric rows). */
enum { VD_MAX_TOKENS = 4096, VD_MAX_METRIC = 256 };

/* Workspace bytes for vd_select (0: select needs none). */
VD_API size_t vd_select_workspace_size(int B, int N, int k);

/* Top-k of scores [B,N] (ties: lower index), outputs in original index order:
 * dominant [B,k,D], rest_tokens [B,N-k,D], rest_metric [B,N-k,M] (metric rows as given),
 * kept_index [B,k] and rest_index [B,N-k] (ascending). Rest pointers may be NULL when N == k.
 * 1 <= k <= N <= VD_MAX_TOKENS. */
VD_API int vd_select(const float* scores, const void* tokens, const float* metric, void* dominant,
    void* rest_tokens, float* rest_metric, int32_t* kept_index, int32_t* rest_index, int B, int N, int D,
    int M, int k, int dtype, void* workspace, void* stream);

/* Workspace bytes for vd_merge (one int32 target assignment per rest row). */
VD_API size_t vd_merge_workspace_size(int B, int R, int c);

/* c contextual tokens [B,c,D] from rest_tokens [B,R,D] and the raw merge metric [B,R,M]:
 * targets at rest positions 0, s, 2s, ... (s = max(1, R / c)), each other row joins the target
 * of highest cosine similarity (first wins), contextual = target + mean(members).
 * assignment [B,R-c] (int32, may be NULL): for each member (the non-target rest rows in ascending
 * order), the index 0..c-1 of the target it joined.
 * 1 <= c <= R <= VD_MAX_TOKENS, 1 <= M <= VD_MAX_METRIC. */
VD_API int vd_merge(const void* rest_tokens, const float* rest_metric, void* contextual, int32_t* assignment, int B,
    int R, int D, int M, int c, int dtype, void* workspace, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* VISIONDROP_KERNELS_H */
