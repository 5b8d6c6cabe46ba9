// Paged attention for single-token queries (decode) on the CPU.
//
// One work item per (sequence, KV head): the query heads that share the KV head are scored against each cached
// key once (K and V are read once, straight from their blocks: no gathered copy), softmax in float32, then the
// weighted sum of the values. Loops are plain so the compiler vectorizes them for the machine it builds on.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// dst[0:n] = float(src[0:n]); bf16 is the top half of a float32, a shift the compiler vectorizes
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// Cached positions first..len-1 of one head, in order: each row converted into `row`, then fn(position - first).
// Walks the blocks, not the positions: no division per position.
template <typename T, typename Fn>
inline void for_each_row(const T* cache, int64_t block_stride, int64_t token_stride, int64_t head_offset,
                         const int64_t* blocks, int64_t block_size, int64_t first, int64_t len, float* row,
                         int64_t head_size, Fn&& fn) {
  for (int64_t p = first; p < len;) {
    const int64_t stop = std::min(len, (p / block_size + 1) * block_size);
    const T* r = cache + blocks[p / block_size] * block_stride + (p % block_size) * token_stride + head_offset;
    for (; p < stop; ++p, r += token_stride) {
      to_float(r, row, head_size);
      fn(p - first);
    }
  }
}

// HS, GS > 0: the head size / query heads per KV head as compile-time constants (unrolled inner loops, the
// accumulators in registers); 0: read at run time
// exp(x) for x <= 0 (scores minus their max) in straight-line code the compiler vectorizes (libm's expf is a
// scalar call per score): 2^(x log2 e) = 2^n * 2^f, |f| <= 1/2, 2^f by its Taylor series to degree 7
// (relative error < 1e-7); below -87 the result is 0 to float precision anyway.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;
  const float n = std::nearbyint(t);
  const float f = (t - n) * 0.693147180559945309f;  // 2^(t-n) = e^f
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T, int64_t HS, int64_t GS>
void decode_attention_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                             double scale, int64_t window) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_size = HS > 0 ? HS : q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = GS > 0 ? GS : num_heads / num_kv_heads;
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t kbs = k_cache.stride(0), kts = k_cache.stride(1), khs = k_cache.stride(2);
  const int64_t vbs = v_cache.stride(0), vts = v_cache.stride(1), vhs = v_cache.stride(2);
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf_(group * head_size), acc_(group * head_size), row_(head_size), scores;
    float* __restrict__ qf = qf_.data();
    float* __restrict__ acc = acc_.data();
    float* __restrict__ row = row_.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t len = lens[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(group * std::max<int64_t>(n, 1));
      const T* qs = qp + (s * num_heads + h * group) * head_size;
      for (int64_t i = 0; i < group * head_size; ++i) qf[i] = static_cast<float>(qs[i]) * fscale;
      const int64_t* blocks = table + s * table_stride;

      for_each_row(kp, kbs, kts, h * khs, blocks, block_size, first, len, row, head_size, [&](int64_t j) {
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf + g * head_size;
          float dot = 0.f;
          for (int64_t d = 0; d < head_size; ++d) dot += qg[d] * row[d];
          scores[g * n + j] = dot;
        }
      });
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          sg[j] = exp_nonpositive(sg[j] - mx);
          sum += sg[j];
        }
        const float inv = n > 0 ? 1.f / sum : 0.f;
        for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
      }
      std::fill(acc, acc + group * head_size, 0.f);
      for_each_row(vp, vbs, vts, h * vhs, blocks, block_size, first, len, row, head_size, [&](int64_t j) {
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * n + j];
          float* ag = acc + g * head_size;
          for (int64_t d = 0; d < head_size; ++d) ag[d] += w * row[d];
        }
      });
      T* os = op + (s * num_heads + h * group) * head_size;
      for (int64_t i = 0; i < group * head_size; ++i) os[i] = static_cast<T>(acc[i]);
    }
  });
}

template <typename T, int64_t HS>
void dispatch_group(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t window) {
#define PAGEPORT_GROUP(G) \
  case G: return decode_attention_kernel<T, HS, G>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
  switch (q.size(1) / k_cache.size(2)) {
    PAGEPORT_GROUP(1) PAGEPORT_GROUP(2) PAGEPORT_GROUP(3) PAGEPORT_GROUP(4) PAGEPORT_GROUP(6) PAGEPORT_GROUP(8)
    default: return decode_attention_kernel<T, HS, 0>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
  }
#undef PAGEPORT_GROUP
}

template <typename T>
void dispatch_head_size(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t window) {
  switch (q.size(2)) {
    case 64: return dispatch_group<T, 64>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
    case 128: return dispatch_group<T, 128>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
    default: return decode_attention_kernel<T, 0, 0>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
  }
}

// out [B, Hq, D] = attention of q [B, Hq, D] over each sequence's first seq_lens[b] cached positions
// (the last `window` of them when window > 0). Caches [num_blocks, block_size, Hkv, D]; block_table [B, n]
// and seq_lens [B] int64.
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                            double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes(),
              "q and out: contiguous [B, Hq, D] of the same shape");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1 && k_cache.size(3) == q.size(2),
              "caches: [num_blocks, block_size, Hkv, D] with unit stride over D");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, caches and out must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 2 && block_table.stride(1) == 1 &&
                  block_table.size(0) == q.size(0),
              "block_table: int64 [B, n] with unit stride over n");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() && seq_lens.numel() == q.size(0),
              "seq_lens: contiguous int64 [B]");
  switch (q.scalar_type()) {
    case at::kFloat:
      return dispatch_head_size<float>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
    case at::kBFloat16:
      return dispatch_head_size<c10::BFloat16>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
    case at::kHalf:
      return dispatch_head_size<c10::Half>(out, q, k_cache, v_cache, block_table, seq_lens, scale, window);
    default:
      TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(pageport_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, float scale, int window) -> ()");
}

TORCH_LIBRARY_IMPL(pageport_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
