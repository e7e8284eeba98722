// gemma_edge::split_kv_sdpa.out, an experiment (bench/split_kv/depth.py, bench/LOG.md "Split-KV"):
// one step's attention of a few query rows over the first `positions` cached keys and values, the
// positions split across ExecuTorch's thread pool.
//
// q: [1, rows, kv_heads, dim] float32; k, v: [1, cache_len, kv_heads, dim], float32 or float16
// (converted to float32 a chunk at a time); out like q. Contiguous. Every row attends to positions
// 0 .. positions - 1 (a decode step's query heads, passed as rows of their KV head, all see the same
// prefix), scaled by `scale`: softmax, then the weighted sum of values.
//
// The question it answers: llama::custom_sdpa splits its work by head and query block, so E2B's one
// KV head and one block of 8 rows is one work item however long the context. Here each work item
// is a chunk of positions (FlashDecoding's split-KV); the chunks are merged by their maxima and sums.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace gemma_edge {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t kPositionsPerChunk = 256;

}  // namespace gemma_edge

// Single-precision matrix product, BLAS's Fortran interface (column-major). ExecuTorch's own
// llama::custom_sdpa calls the same symbol; the process has it from libtorch_cpu (MKL on x86-64,
// OpenBLAS on aarch64), which ExecuTorch's Python runtime links. The wheel ships no header for it.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace gemma_edge {
namespace {

// C = alpha op(A) op(B), column-major, as BLAS; `transpose_a` picks op(A) = A^T.
void gemm(bool transpose_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  const char ta = transpose_a ? 'T' : 'N', tb = 'N';
  const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
  const float beta = 0.0f;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

struct Shape {
  int64_t rows, kv_heads, dim, positions, chunks;
};

// The chunk's keys or values of one head as float32: a float cache as it is (positions `stride` apart),
// a float16 one converted into `scratch` (positions `dim` apart); `ld` says which.
const float* as_float(const float* cache, int64_t first, int64_t /*count*/, int64_t stride, int64_t head, int64_t dim,
                      std::vector<float>&, int64_t* ld) {
  *ld = stride;
  return cache + first * stride + head * dim;
}

const float* as_float(const _Float16* cache, int64_t first, int64_t count, int64_t stride, int64_t head,
                      int64_t dim, std::vector<float>& scratch, int64_t* ld) {
  scratch.resize(count * dim);
  for (int64_t p = 0; p < count; ++p) {
    const _Float16* from = cache + (first + p) * stride + head * dim;
    float* to = scratch.data() + p * dim;
    for (int64_t d = 0; d < dim; ++d) to[d] = static_cast<float>(from[d]);
  }
  *ld = dim;
  return scratch.data();
}

// One chunk of positions for one KV head: each row's running maximum, sum of weights and
// weighted sum of values over [first, last).
template <typename Cache>
void attend_chunk(const float* q, const Cache* kc, const Cache* vc, const Shape& s, float scale, int64_t head,
                  int64_t chunk, float* max_out, float* sum_out, float* acc_out) {
  const int64_t first = chunk * kPositionsPerChunk;
  const int64_t last = std::min(first + kPositionsPerChunk, s.positions);
  const int64_t stride = s.kv_heads * s.dim;  // between positions in k and v, and rows in q
  const int64_t count = last - first;
  std::vector<float> kscratch, vscratch;
  int64_t ldk, ldv;
  const float* k = as_float(kc, first, count, stride, head, s.dim, kscratch, &ldk);
  // scores[r * count + p] = scale * q_r . k_p: column-major [count x rows] = K [count x dim] * Q^T [dim x rows].
  std::vector<float> scores(count * s.rows);
  gemm(true, count, s.rows, s.dim, scale, k, ldk, q + head * s.dim, stride, scores.data(), count);
  for (int64_t r = 0; r < s.rows; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < count; ++p) m = std::max(m, scores[r * count + p]);
    float total = 0.0f;
    for (int64_t p = 0; p < count; ++p) {
      float w = std::exp(scores[r * count + p] - m);
      scores[r * count + p] = w;
      total += w;
    }
    max_out[r] = m;
    sum_out[r] = total;
  }
  // acc[r * dim + d] = sum_p w[r, p] v_p[d]: column-major [dim x rows] = V^T [dim x count] * W^T [count x rows].
  const float* v = as_float(vc, first, count, stride, head, s.dim, vscratch, &ldv);
  gemm(false, s.dim, s.rows, count, 1.0f, v, ldv, scores.data(), count, acc_out, s.dim);
}

// Merge the chunks of one KV head into the output rows.
void merge_chunks(const float* maxima, const float* sums, const float* accs, const Shape& s, int64_t head,
                  float* out) {
  const int64_t stride = s.kv_heads * s.dim;
  for (int64_t r = 0; r < s.rows; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < s.chunks; ++c) m = std::max(m, maxima[(head * s.chunks + c) * s.rows + r]);
    float* row = out + r * stride + head * s.dim;
    std::fill(row, row + s.dim, 0.0f);
    float total = 0.0f;
    for (int64_t c = 0; c < s.chunks; ++c) {
      const int64_t at = (head * s.chunks + c) * s.rows + r;
      const float w = std::exp(maxima[at] - m);
      total += w * sums[at];
      const float* acc = accs + at * s.dim;
      for (int64_t d = 0; d < s.dim; ++d) row[d] += w * acc[d];
    }
    const float inverse = 1.0f / total;
    for (int64_t d = 0; d < s.dim; ++d) row[d] *= inverse;
  }
}

bool valid_inputs(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, int64_t positions,
                  const Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && out.dim() == 4, InvalidArgument, false,
                      "split_kv_sdpa: q, k, v and out must be 4-D");
  ET_KERNEL_CHECK_MSG(ctx,
                      q.scalar_type() == ScalarType::Float &&
                          k.scalar_type() == v.scalar_type() && out.scalar_type() == ScalarType::Float &&
                      (k.scalar_type() == ScalarType::Float || k.scalar_type() == ScalarType::Half),
                      InvalidArgument, false, "split_kv_sdpa: float32 queries, float32 or float16 caches");
  ET_KERNEL_CHECK_MSG(ctx, q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1, InvalidArgument, false,
                      "split_kv_sdpa: batch 1 only");
  ET_KERNEL_CHECK_MSG(ctx,
                      k.size(2) == q.size(2) && v.size(2) == q.size(2) && k.size(3) == q.size(3) &&
                          v.size(3) == q.size(3) && v.size(1) == k.size(1),
                      InvalidArgument, false, "split_kv_sdpa: q, k and v disagree on heads or dim");
  ET_KERNEL_CHECK_MSG(ctx, positions >= 1 && positions <= k.size(1), InvalidArgument, false,
                      "split_kv_sdpa: positions %lld outside 1..%lld", static_cast<long long>(positions),
                      static_cast<long long>(k.size(1)));
  ET_KERNEL_CHECK_MSG(ctx, out.numel() == q.numel(), InvalidArgument, false, "split_kv_sdpa: out must match q");
  return true;
}

}  // namespace

Tensor& split_kv_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                          int64_t positions, double scale, Tensor& out) {
  if (!valid_inputs(ctx, q, k, v, positions, out)) {
    return out;
  }
  Shape s{q.size(1), q.size(2), q.size(3), positions, (positions + kPositionsPerChunk - 1) / kPositionsPerChunk};
  std::vector<float> maxima(s.kv_heads * s.chunks * s.rows), sums(maxima.size()), accs(maxima.size() * s.dim);
  const float* qd = q.const_data_ptr<float>();
  const bool half = k.scalar_type() == ScalarType::Half;
  ::executorch::extension::parallel_for(0, s.kv_heads * s.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t at = item * s.rows;
      if (half) {
        attend_chunk(qd, reinterpret_cast<const _Float16*>(k.const_data_ptr()),
                     reinterpret_cast<const _Float16*>(v.const_data_ptr()), s, static_cast<float>(scale),
                     item / s.chunks, item % s.chunks, maxima.data() + at, sums.data() + at, accs.data() + at * s.dim);
      } else {
        attend_chunk(qd, k.const_data_ptr<float>(), v.const_data_ptr<float>(), s, static_cast<float>(scale),
                     item / s.chunks, item % s.chunks, maxima.data() + at, sums.data() + at, accs.data() + at * s.dim);
      }
    }
  });
  for (int64_t head = 0; head < s.kv_heads; ++head) {
    merge_chunks(maxima.data(), sums.data(), accs.data(), s, head, out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace gemma_edge

EXECUTORCH_LIBRARY(gemma_edge, "split_kv_sdpa.out", gemma_edge::split_kv_sdpa_out);
