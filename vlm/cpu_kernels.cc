// A decode step on a CPU (vlm/cpu_kernels.py says when these are used), as XLA FFI custom calls:
// - y = x @ w.T for a few rows of activations x [R, K] and a weight matrix w [N, K] (Hugging Face layout):
//   bf16 x bf16 accumulated in f32, or int8 x int8 accumulated in int32 (vlm/quantize.py's W8A8, exact);
// - one query token's attention over a bf16 KV cache (at the end).
//
// Why: decoding a token reads every weight once. XLA:CPU's bf16 and int8 products of a few rows are
// compute-bound at ~16 and ~14 GB/s of weights on a 2-core AVX-512 EPYC, under half its memory
// bandwidth; this reads each weight once for all R rows, at memory speed.
//
// Numerics: every y[r, n] is one accumulator over k and a fixed-order lane sum, the same instructions
// whatever R is and however the work is split between threads, so a row's result does not depend on
// the other rows of the batch (the streaming and scan samplers give the same tokens).
//
// Threads: the work is split into chunks (of weight rows; of (row, kv head) pairs) that the calling
// thread and XLA's intra-op thread pool take in turn; the caller waits only for chunks another took.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kRowTile = 4;  // rows of x sharing each weight load
constexpr int kColTile = 4;  // rows of w sharing each x load

constexpr int64_t kAlign = 32;  // K must be a multiple (Qwen3-VL's are; vlm/cpu_kernels.py checks)

// Each Op multiplies one element type: In (x and w), Out (y), a vector accumulator Acc that takes
// `kStep` elements of k (a divisor of kAlign) per madd, and `total` (a fixed-order sum).
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)

struct Bf16 {  // 32 bf16 pairs into 16 f32 lanes (vdpbf16ps)
  using In = uint16_t;
  using Out = float;
  using Acc = __m512;
  using Vec = __m512bh;
  static constexpr int kStep = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec load(const In* p) { return (Vec)_mm512_loadu_si512(p); }
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }
  static Out total(Acc acc) { return _mm512_reduce_add_ps(acc); }
};

struct Int8 {  // 32 int8 widened to int16, pairs into 16 int32 lanes (vpdpwssd): exact
  using In = int8_t;
  using Out = int32_t;
  using Acc = __m512i;
  using Vec = __m512i;
  static constexpr int kStep = 32;
  static Acc zero() { return _mm512_setzero_si512(); }
  static Vec load(const In* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm512_dpwssd_epi32(acc, w, x); }
  static Out total(Acc acc) { return _mm512_reduce_add_epi32(acc); }
};

#else  // Any other CPU: portable vector code (GCC/Clang vector extensions)

template <typename In_, typename Out_, typename Wide>
struct Portable {  // 16 elements widened to 16 lanes of Out_; bf16 -> f32 is a 16-bit shift
  using In = In_;
  using Out = Out_;
  typedef Out Acc __attribute__((vector_size(16 * sizeof(Out))));
  using Vec = Acc;
  static constexpr int kStep = 16;
  static Acc zero() { return Acc{}; }
  static Vec load(const In* p) {
    typedef In Narrow __attribute__((vector_size(16 * sizeof(In))));
    Narrow n;
    std::memcpy(&n, p, sizeof n);
    const Wide wide = __builtin_convertvector(n, Wide);
    if constexpr (sizeof(In) == 2) {  // bf16 bits -> f32 bits
      const Wide bits = wide << 16;
      Vec v;
      std::memcpy(&v, &bits, sizeof v);
      return v;
    } else {
      return wide;
    }
  }
  static Acc madd(Acc acc, Vec w, Vec x) { return acc + w * x; }
  static Out total(Acc acc) {
    Out t = 0;
    for (int j = 0; j < 16; ++j) t += acc[j];
    return t;
  }
};
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
using Bf16 = Portable<uint16_t, float, u32x16>;
using Int8 = Portable<int8_t, int32_t, i32x16>;

#endif

// y[r, i] for RB rows of x and NB rows of w: each weight vector is loaded once for RB rows and each x
// vector once for NB weight rows; one accumulator per (r, i). K is a multiple of kAlign.
template <typename Op, int RB, int NB>
void tile(const typename Op::In* x, const typename Op::In* w, typename Op::Out* y, int64_t K, int64_t N) {
  typename Op::Acc acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < NB; ++i) acc[r][i] = Op::zero();
  for (int64_t k = 0; k < K; k += Op::kStep) {
    typename Op::Vec wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = Op::load(w + i * K + k);
    for (int i = 0; i < NB; ++i) __builtin_prefetch(w + (NB + i) * K + k);  // the next tile's rows
    for (int r = 0; r < RB; ++r) {
      const typename Op::Vec xv = Op::load(x + r * K + k);
      for (int i = 0; i < NB; ++i) acc[r][i] = Op::madd(acc[r][i], wv[i], xv);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < NB; ++i) y[r * N + i] = Op::total(acc[r][i]);
}

// tile<Op, rb, nb> for rb <= RB, nb <= NB known only at run time (the edges of the matrices).
template <typename Op, int RB, int NB>
void any_tile(int64_t rb, int64_t nb, const typename Op::In* x, const typename Op::In* w, typename Op::Out* y,
              int64_t K, int64_t N) {
  if constexpr (RB > 1)
    if (rb < RB) return any_tile<Op, RB - 1, NB>(rb, nb, x, w, y, K, N);
  if constexpr (NB > 1)
    if (nb < NB) return any_tile<Op, RB, NB - 1>(rb, nb, x, w, y, K, N);
  tile<Op, RB, NB>(x, w, y, K, N);
}

// y[:, n0:n1] for all R rows, in kRowTile x kColTile tiles (smaller at the edges).
template <typename Op>
void columns(const typename Op::In* x, const typename Op::In* w, typename Op::Out* y, int64_t R, int64_t K,
             int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kColTile) {
    const int64_t nb = std::min<int64_t>(kColTile, n1 - n);
    for (int64_t r = 0; r < R; r += kRowTile) {
      const int64_t rb = std::min<int64_t>(kRowTile, R - r);
      any_tile<Op, kRowTile, kColTile>(rb, nb, x + r * K, w + n * K, y + r * N + n, K, N);
    }
  }
}

// fn(i) for every i in [0, n), taken in turn by the calling thread and XLA's intra-op pool; returns when
// all are done. The caller waits only for tasks another thread took; a pool task that starts after the
// call has returned finds nothing left to take (the shared state outlives it).
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto run = [progress, n, fn] {
    for (int64_t i; (i = progress->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      fn(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < pool.num_threads(); ++t) pool.Schedule([run] { run(); });
  run();
  while (progress->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <typename Op, ffi::DataType In, ffi::DataType Out>
ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<In> x, ffi::Buffer<In> w, ffi::ResultBuffer<Out> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % kAlign != 0 || x.element_count() % wd[1] != 0)
    return ffi::Error::InvalidArgument("cpu_kernels: expected x [R, K] and w [N, K] with K a multiple of 32");
  const auto* xp = reinterpret_cast<const typename Op::In*>(x.untyped_data());
  const auto* wp = reinterpret_cast<const typename Op::In*>(w.untyped_data());
  auto* yp = reinterpret_cast<typename Op::Out*>(y->untyped_data());
  const int64_t N = wd[0], K = wd[1], R = x.element_count() / K;
  // ~64 chunks (whole column tiles) balance the threads when one of them starts late.
  const int64_t chunk = std::max<int64_t>(kColTile, (N + 63) / 64 / kColTile * kColTile);
  parallel_for(pool, (N + chunk - 1) / chunk,
               [=](int64_t c) { columns<Op>(xp, wp, yp, R, K, N, c * chunk, std::min(N, (c + 1) * chunk)); });
  return ffi::Error::Success();
}

// One query token's attention over a bf16 KV cache (a decode step), per (row, kv head): scores in f32,
// softmax over the slots `keep` keeps, probabilities rounded to bf16 (as vlm.ops.attention does), then
// their weighted sum of the V rows in f32. q [B, Kv, G, D], k/v [B, Kv, S, D],
// keep [B, S], scale -> out [B, Kv, G, D] f32. Each (row, kv head) is one task: rows stay independent.
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// exp(x) for x <= 0 in plain arithmetic (so loops over it vectorize): 2^(x log2 e) as 2^n times a
// degree-6 polynomial for 2^f, f in [0, 1); relative error ~2e-7, below a bf16 probability's rounding.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504f;
  const float n = std::floor(t), f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184373e-3f;
  p = p * f + 5.5503325e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314720e-1f;
  p = p * f + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

void attend(const uint16_t* q, const uint16_t* k, const uint16_t* v, const bool* keep, float scale, float* out,
            int64_t G, int64_t S, int64_t D) {
  std::vector<float> qf(G * D), p(G * S, 0.f);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = bf16_to_f32(q[i]) * scale;
  for (int64_t s = 0; s < S; ++s) {
    if (!keep[s]) continue;
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qf[g * D + d] * bf16_to_f32(k[s * D + d]);
      p[g * S + s] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p.data() + g * S;
    float top = -INFINITY, total = 0.f;
    for (int64_t s = 0; s < S; ++s)
      if (keep[s]) top = std::max(top, pg[s]);
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; ++s) {
      pg[s] = keep[s] ? exp_nonpositive(pg[s] - top) : 0.f;
      total += pg[s];
    }
    const float norm = total > 0.f ? total : 1.f;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) pg[s] = bf16_to_f32(f32_to_bf16(pg[s] / norm));
  }
  std::fill(out, out + G * D, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    if (!keep[s]) continue;
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * S + s];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += w * bf16_to_f32(v[s * D + d]);
    }
  }
}

ffi::Error AttendOneQuery(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                          ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::PRED> keep, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3])
    return ffi::Error::InvalidArgument("cpu attention: expected q [B, Kv, G, D] and k/v [B, Kv, S, D]");
  const int64_t heads = qd[0] * qd[1], G = qd[2], D = qd[3], S = kd[2], kv = qd[1];
  const auto* qp = reinterpret_cast<const uint16_t*>(q.untyped_data());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.untyped_data());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.untyped_data());
  const bool* mp = keep.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, heads, [=](int64_t h) {
    attend(qp + h * G * D, kp + h * S * D, vp + h * S * D, mp + (h / kv) * S, scale, op + h * G * D, G, S, D);
  });
  return ffi::Error::Success();
}

}  // namespace

// bf16 x bf16 -> f32, and int8 x int8 -> int32 (vlm/quantize.py's W8A8 product, exactly).
#define VLM_BINDING(IN, OUT) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<IN>>().Arg<ffi::Buffer<IN>>().Ret<ffi::Buffer<OUT>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatvecBf16, (Matvec<Bf16, ffi::BF16, ffi::F32>), VLM_BINDING(ffi::BF16, ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatvecInt8, (Matvec<Int8, ffi::S8, ffi::S32>), VLM_BINDING(ffi::S8, ffi::S32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuAttendOneQueryBf16, AttendOneQuery,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
