// y = x @ w.T for a few rows of activations x [R, K] and a weight matrix w [N, K] (Hugging Face layout):
// bf16 x bf16 accumulated in f32, or int8 x int8 accumulated in int32 (vlm/quantize.py's W8A8, exact).
// These are the products of a decode step on a CPU (vlm/cpu_matvec.py says when they are used).
//
// Why: decoding a token reads every weight once. XLA:CPU's bf16 and int8 products of a few rows are
// compute-bound at ~16 and ~14 GB/s of weights on a 2-core AVX-512 EPYC, under half its memory
// bandwidth; this reads each weight once for all R rows, at memory speed.
//
// Numerics: every y[r, n] is one accumulator over k and a fixed-order lane sum, the same instructions
// whatever R is and however the work is split between threads, so a row's result does not depend on
// the other rows of the batch (the streaming and scan samplers give the same tokens).
//
// An XLA FFI custom call (jax.ffi): the work is split into chunks of weight rows that the calling thread
// and XLA's intra-op thread pool take in turn; the caller waits only for chunks another thread took.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kRowTile = 4;  // rows of x sharing each weight load
constexpr int kColTile = 4;  // rows of w sharing each x load

constexpr int64_t kAlign = 32;  // K must be a multiple (Qwen3-VL's are; vlm/cpu_matvec.py checks)

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

// Shared by the caller and the pool tasks, which may start after the call has returned (shared_ptr).
template <typename Op>
struct Work {
  const typename Op::In* x;
  const typename Op::In* w;
  typename Op::Out* y;
  int64_t R, K, N, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      columns<Op>(x, w, y, R, K, N, c * chunk, std::min(N, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename Op, ffi::DataType In, ffi::DataType Out>
ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<In> x, ffi::Buffer<In> w, ffi::ResultBuffer<Out> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % kAlign != 0 || x.element_count() % wd[1] != 0)
    return ffi::Error::InvalidArgument("cpu_matvec: expected x [R, K] and w [N, K] with K a multiple of 32");
  auto work = std::make_shared<Work<Op>>();
  work->x = reinterpret_cast<const typename Op::In*>(x.untyped_data());
  work->w = reinterpret_cast<const typename Op::In*>(w.untyped_data());
  work->y = reinterpret_cast<typename Op::Out*>(y->untyped_data());
  work->N = wd[0];
  work->K = wd[1];
  work->R = x.element_count() / wd[1];
  // ~64 chunks (whole column tiles) balance the threads when one of them starts late.
  work->chunk = std::max<int64_t>(kColTile, (work->N + 63) / 64 / kColTile * kColTile);
  work->chunks = (work->N + work->chunk - 1) / work->chunk;
  for (int64_t i = 1; i < pool.num_threads(); ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

// bf16 x bf16 -> f32, and int8 x int8 -> int32 (vlm/quantize.py's W8A8 product, exactly).
#define VLM_BINDING(IN, OUT) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<IN>>().Arg<ffi::Buffer<IN>>().Ret<ffi::Buffer<OUT>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatvecBf16, (Matvec<Bf16, ffi::BF16, ffi::F32>), VLM_BINDING(ffi::BF16, ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatvecInt8, (Matvec<Int8, ffi::S8, ffi::S32>), VLM_BINDING(ffi::S8, ffi::S32));
