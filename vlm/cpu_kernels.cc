// The heavy parts of a bf16 (or int8) model on a CPU where XLA:CPU's own are slow, as XLA FFI custom
// calls (vlm/cpu_kernels.py says when each is used, and how fast):
// - y = x @ w.T for a few rows of activations x [R, K] and a weight matrix w [N, K] (Hugging Face layout):
//   bf16 x bf16 accumulated in f32, or int8 x int8 accumulated in int32 (vlm/quantize.py's W8A8, exact).
//   Decoding a token reads every weight once: this reads each once for all R rows, at memory speed;
// - one query token's attention over a bf16 KV cache (a decode step);
// - attention over a range of keys per query: the vision tower's (each patch over its own image's
//   patches) and a prompt's (causal);
// - y = x @ w.T in bf16 for many rows (a prefill), reading the weights in place (at the end).
//
// Numerics: every y[r, n] is one accumulator over k (and in the decode product a fixed-order lane sum),
// the same instructions whatever R is and however the work is split between threads, so a row's result
// does not depend on the other rows of the batch (the streaming and scan samplers give the same tokens).
//
// Threads: the work is split into chunks (of weight rows; of (row, kv head) pairs) that the calling
// thread and XLA's intra-op thread pool take in turn; the caller waits only for chunks another took.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

// Four builds, by what -march=native finds: AVX-512 with BF16 (vdpbf16ps) and VNNI (vpdpwssd), as on
// AMD Zen 4 and on Intel Sapphire Rapids and later (whose AMX tiles also run the prefill kernels); AVX-512
// without them (bf16 widened to f32 by a shift or a mask, then FMAs), as on Intel servers whose VM hides
// BF16; AVX2 with FMA (the same widening, 8 lanes), as on AMD Zen 2/3; portable vector code elsewhere.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VLM_AVX512 1
#if defined(__AVX512BF16__)
#define VLM_AVX512_BF16 1
#endif
#if defined(__AVX512VNNI__)
#define VLM_AVX512_VNNI 1
#endif
#if defined(VLM_AVX512_BF16) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define VLM_AMX 1  // Intel Sapphire Rapids and later: the prefill product in AMX tiles (16 x 16 f32 a tile)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if !defined(VLM_AVX512_BF16)
#define VLM_AVX512_SPLIT 1  // bf16 widened to f32 for FMAs: operands split into f32 once, where they can be
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VLM_AVX2 1  // AVX2 and FMA (AMD Zen 2/3, Intel client cores): the kernels in 8-lane vectors
#endif
#if defined(VLM_AVX512_SPLIT) || defined(VLM_AVX2)
#define VLM_SPLIT 1  // the prefill product's operands split into f32 once (packed x, a task's weights)
#endif

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A bf16 pair as two f32 (bf16 is f32's upper half): the even element and the odd one.
struct SplitPair {
  float even, odd;
};
inline SplitPair split_pair(uint32_t bits) {
  return {bf16_to_f32(uint16_t(bits)), bf16_to_f32(uint16_t(bits >> 16))};
}

constexpr int kRowTile = 4;  // rows of x sharing each weight load
#if defined(VLM_AVX2)  // 16 vector registers: 4 x 2 accumulators and the loads beside them (2 x 4 and 3 x 4
constexpr int kColTile = 2;  // were 15-25 % slower at 8 rows on a Zen 3; one row: 1 x 4 tiles)
#else
constexpr int kColTile = 4;  // rows of w sharing each x load
#endif

constexpr int64_t kAlign = 32;  // K must be a multiple (Qwen3-VL's are; vlm/cpu_kernels.py checks)

// Each Op multiplies one element type: In (x and w), Out (y), a vector accumulator Acc that takes
// `kStep` elements of k (a divisor of kAlign) per madd, and `total` (a fixed-order sum).
#if defined(VLM_AVX512)

// 32 bf16 as two vectors of 16 f32: the even elements (shifted up 16 bits) and the odd ones (masked).
struct Bf16Pairs {
  __m512 even, odd;
};
inline Bf16Pairs split_bf16_pairs(__m512i v) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))))};
}

struct Bf16 {  // 32 bf16 pairs into 16 f32 lanes: one vdpbf16ps, or two FMAs (exact products either way)
  using In = uint16_t;
  using Out = float;
  using Acc = __m512;
#if defined(VLM_AVX512_BF16)
  using Vec = __m512bh;
  static Vec load(const In* p) { return (Vec)_mm512_loadu_si512(p); }
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }
#else
  using Vec = Bf16Pairs;
  static Vec load(const In* p) { return split_bf16_pairs(_mm512_loadu_si512(p)); }
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm512_fmadd_ps(w.odd, x.odd, _mm512_fmadd_ps(w.even, x.even, acc)); }
  // x, which every weight row meets, is split into f32 pairs once per call, not at every load:
  // each 32 elements as their 16 even ones then their 16 odd ones, so x[r * K + k] stays the address.
  using XIn = float;
  static Vec load_x(const XIn* p) { return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)}; }
  static void store_x(XIn* p, Vec v) { _mm512_storeu_ps(p, v.even), _mm512_storeu_ps(p + 16, v.odd); }
#endif
  static constexpr int kStep = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Out total(Acc acc) { return _mm512_reduce_add_ps(acc); }
};

struct Int8 {  // 32 int8 widened to int16, pairs into 16 int32 lanes (vpdpwssd, or vpmaddwd + add): exact
  using In = int8_t;
  using Out = int32_t;
  using Acc = __m512i;
  using Vec = __m512i;
  static constexpr int kStep = 32;
  static Acc zero() { return _mm512_setzero_si512(); }
  static Vec load(const In* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
#if defined(VLM_AVX512_VNNI)
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm512_dpwssd_epi32(acc, w, x); }
#else
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }
#endif
  static Out total(Acc acc) { return _mm512_reduce_add_epi32(acc); }
};

#elif defined(VLM_AVX2)

// 16 bf16 as two vectors of 8 f32: the even elements (shifted up 16 bits) and the odd ones (masked).
struct Bf16Pairs {
  __m256 even, odd;
};
inline Bf16Pairs split_bf16_pairs(__m256i v) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))))};
}

struct Bf16 {  // 16 bf16 pairs into 8 f32 lanes: two FMAs (exact products)
  using In = uint16_t;
  using Out = float;
  using Acc = __m256;
  using Vec = Bf16Pairs;
  static constexpr int kStep = 16;
  static Acc zero() { return _mm256_setzero_ps(); }
  static Vec load(const In* p) { return split_bf16_pairs(_mm256_loadu_si256((const __m256i*)p)); }
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm256_fmadd_ps(w.odd, x.odd, _mm256_fmadd_ps(w.even, x.even, acc)); }
  // x is split at each load, not once per call as in the AVX-512 build without BF16: split, 8 rows of x
  // are twice the bytes, read again for every 2 weight rows (Zen 4 cores running this build, 28 distinct
  // 2B weights: 8 rows 12-15 -> 17-18 GB/s, 4 rows 23-28 -> 27-33; 1 row the same)
  static Out total(Acc acc) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

struct Int8 {  // 16 int8 widened to int16, pairs into 8 int32 lanes (vpmaddwd + add): exact
  using In = int8_t;
  using Out = int32_t;
  using Acc = __m256i;
  using Vec = __m256i;
  static constexpr int kStep = 16;
  static Acc zero() { return _mm256_setzero_si256(); }
  static Vec load(const In* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
  static Acc madd(Acc acc, Vec w, Vec x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
  static Out total(Acc acc) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
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

// x as the Op reads it: as given, or, where the Op has an XIn, converted once per call (Op::store_x).
template <typename Op, typename = void>
struct XOf {
  using In = typename Op::In;
  static typename Op::Vec load(const In* p) { return Op::load(p); }
  static const In* prepare(const In* x, int64_t, std::vector<In>&) { return x; }
};
template <typename Op>
struct XOf<Op, std::void_t<typename Op::XIn>> {
  using In = typename Op::XIn;
  static typename Op::Vec load(const In* p) { return Op::load_x(p); }
  static const In* prepare(const typename Op::In* x, int64_t n, std::vector<In>& scratch) {
    scratch.resize(n);
    for (int64_t i = 0; i < n; i += Op::kStep) Op::store_x(scratch.data() + i, Op::load(x + i));
    return scratch.data();
  }
};

// y[r, i] for RB rows of x and NB rows of w: each weight vector is loaded once for RB rows and each x
// vector once for NB weight rows; one accumulator per (r, i). K is a multiple of kAlign. Rows [pf_lo, pf_hi)
// of the next tile are prefetched meanwhile.
template <typename Op, int RB, int NB>
void tile(const typename XOf<Op>::In* x, const typename Op::In* w, typename Op::Out* y, int64_t K, int64_t N,
          int pf_lo, int pf_hi) {
  typename Op::Acc acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < NB; ++i) acc[r][i] = Op::zero();
  for (int64_t k = 0; k < K; k += Op::kStep) {
    typename Op::Vec wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = Op::load(w + i * K + k);
    // the next tile's rows, into L2 (prefetcht1): into L1 (t0) they tie up L1's few outstanding misses,
    // and one core read 17 GB/s instead of 25 (two: ~170 instead of ~250 GFLOP/s at 8 rows)
    for (int i = pf_lo; i < pf_hi; ++i) __builtin_prefetch(w + (NB + i) * K + k, 0, 2);
    for (int r = 0; r < RB; ++r) {
      const typename Op::Vec xv = XOf<Op>::load(x + r * K + k);
      for (int i = 0; i < NB; ++i) acc[r][i] = Op::madd(acc[r][i], wv[i], xv);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < NB; ++i) y[r * N + i] = Op::total(acc[r][i]);
}

// tile<Op, rb, nb> for rb <= RB, nb <= NB known only at run time (the edges of the matrices).
template <typename Op, int RB, int NB>
void any_tile(int64_t rb, int64_t nb, const typename XOf<Op>::In* x, const typename Op::In* w, typename Op::Out* y,
              int64_t K, int64_t N, int pf_lo = 0, int pf_hi = NB) {
  if constexpr (RB > 1)
    if (rb < RB) return any_tile<Op, RB - 1, NB>(rb, nb, x, w, y, K, N, pf_lo, pf_hi);
  if constexpr (NB > 1)
    if (nb < NB) return any_tile<Op, RB, NB - 1>(rb, nb, x, w, y, K, N, pf_lo, std::min(pf_hi, NB - 1));
  tile<Op, RB, NB>(x, w, y, K, N, pf_lo, pf_hi);
}

// The columns of a tile of kRowTile rows (the weight rows sharing each x load), by Op: its accumulators,
// weight vectors and x vector fill the vector registers.
template <typename Op>
constexpr int kColTileOf = kColTile;
#if defined(VLM_AVX512_BF16)
// one vdpbf16ps a madd: 4 x 6 accumulators, 6 weight vectors and x in 31 of the 32 registers. At 8 rows
// (2B shapes, 2-core Zen 4): ~10 % faster than 4 x 4 from cache, 1-7 % reading the weights from memory;
// int8's widening loads were slower at 4 x 6.
template <>
constexpr int kColTileOf<Bf16> = 6;
#endif

// y[:, n0:n1] for all R rows, in kRowTile x kColTileOf<Op> tiles (smaller at the edges); one row in
// 1 x 2kColTile tiles (more weight rows in flight: ~10 % faster on one core). More than kRowTile rows pass
// over each tile of weights several times, each pass prefetching its share of the next tile's rows, so that
// the reads from memory go on through every pass, not only the first (8 rows, 2B weights on a 2-core Xeon:
// 16.5 -> 18.6 GB/s; 16 rows: 8.8 -> 10.2).
template <typename Op>
void columns(const typename XOf<Op>::In* x, const typename Op::In* w, typename Op::Out* y, int64_t R, int64_t K,
             int64_t N, int64_t n0, int64_t n1) {
  if (R == 1) {
    for (int64_t n = n0; n < n1; n += 2 * kColTile)
      any_tile<Op, 1, 2 * kColTile>(1, std::min<int64_t>(2 * kColTile, n1 - n), x, w + n * K, y + n, K, N);
    return;
  }
  constexpr int cols = kColTileOf<Op>;
  const int64_t passes = (R + kRowTile - 1) / kRowTile;
  for (int64_t n = n0; n < n1; n += cols) {
    const int64_t nb = std::min<int64_t>(cols, n1 - n);
    for (int64_t r = 0, pass = 0; r < R; r += kRowTile, ++pass) {
      const int64_t rb = std::min<int64_t>(kRowTile, R - r);
      any_tile<Op, kRowTile, cols>(rb, nb, x + r * K, w + n * K, y + r * N + n, K, N, int(pass * cols / passes),
                                   int((pass + 1) * cols / passes));
    }
  }
}

// fn(i) for every i in [0, n) on the calling thread and XLA's intra-op pool; returns when all are done.
// Each thread owns a contiguous share of [0, n) and takes its tasks in order, then takes what is left of
// the others' shares (a pool thread that starts late loses its share's tail, not the balance). Contiguous
// shares keep each thread's reads of a weight matrix sequential: two threads taking tasks in turn read
// neighbouring 64-384 KB chunks, and a 2B decode step's products read 5 % slower at the median, 12 % at
// the best (2-core Zen 4, A/B in one process; a plain two-thread read in a fast phase: ~38 GB/s in 64 KB
// chunks taken in turn, ~50 in two halves). The caller waits only for tasks another thread took; a pool
// task that starts after the call has returned finds nothing left to take (the shared state outlives it).
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  struct alignas(64) Share {
    std::atomic<int64_t> next;
    int64_t end;
  };
  struct Progress {
    std::unique_ptr<Share[]> shares;
    alignas(64) std::atomic<int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  progress->shares.reset(new Share[threads]);
  for (int64_t t = 0; t < threads; ++t) {
    progress->shares[t].next.store(t * n / threads, std::memory_order_relaxed);
    progress->shares[t].end = (t + 1) * n / threads;
  }
  auto run = [progress, threads, fn](int64_t t) {
    for (int64_t u = 0; u < threads; ++u) {
      Share& share = progress->shares[(t + u) % threads];
      for (int64_t i; (i = share.next.fetch_add(1, std::memory_order_relaxed)) < share.end;) {
        fn(i);
        progress->done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run, t] { run(t); });
  run(0);
  while (progress->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// A loop over layers (vlm/model.py) passes a product every layer's weights and the layer's index, and
// the kernel reads that layer's in place; outside one, one weight array and index 0.
template <ffi::DataType T>
ffi::ErrorOr<ffi::Buffer<T>> layer_of(ffi::RemainingArgs weights, ffi::Buffer<ffi::S32> layer) {
  const int64_t i = layer.element_count() == 1 ? layer.typed_data()[0] : -1;
  if (i < 0 || i >= int64_t(weights.size()))
    return ffi::Unexpected(ffi::Error::InvalidArgument("cpu_kernels: layer index out of range"));
  return weights.get<ffi::Buffer<T>>(i);
}

template <typename Op, ffi::DataType In, ffi::DataType Out>
ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<In> x, ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs weights,
                  ffi::ResultBuffer<Out> y) {
  const auto w = layer_of<In>(weights, layer);
  if (!w.has_value()) return w.error();
  const auto wd = w->dimensions();
  if (wd.size() != 2 || wd[1] % kAlign != 0 || x.element_count() % wd[1] != 0)
    return ffi::Error::InvalidArgument("cpu_kernels: expected x [R, K] and w [N, K] with K a multiple of 32");
  const auto* wp = reinterpret_cast<const typename Op::In*>(w->untyped_data());
  auto* yp = reinterpret_cast<typename Op::Out*>(y->untyped_data());
  const int64_t N = wd[0], K = wd[1], R = x.element_count() / K;
  thread_local std::vector<typename XOf<Op>::In> scratch;  // the caller's; the pool's threads only read it
  const auto* xp = XOf<Op>::prepare(reinterpret_cast<const typename Op::In*>(x.untyped_data()), R * K, scratch);
  // ~64 chunks (whole column tiles) balance the threads when one of them starts late.
  const int64_t tile = R == 1 ? 2 * kColTile : kColTileOf<Op>;
  const int64_t chunk = std::max<int64_t>(tile, (N + 63) / 64 / tile * tile);
  parallel_for(pool, (N + chunk - 1) / chunk,
               [=](int64_t c) { columns<Op>(xp, wp, yp, R, K, N, c * chunk, std::min(N, (c + 1) * chunk)); });
  return ffi::Error::Success();
}

// One query token's attention over a bf16 KV cache (a decode step), per (row, kv head): scores in f32,
// softmax over the slots `keep` keeps, probabilities rounded to bf16 (as vlm.ops.attention does), then
// their weighted sum of the V rows in f32. q [B, Kv, G, D], the layer's index, k/v [B, Kv, S, D] (index
// 0) or a cache stacked over layers [L, B, Kv, S, D], keep [B, S], scale -> out [B, Kv, G, D] f32. Each
// (row, kv head) is one task: rows stay independent.
inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Vectors of floats and ints in plain vector code, as wide as the CPU's (GCC turns a select of 16-lane
// vectors into scalar code on AVX2).
#if defined(VLM_AVX2)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 16;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef int32_t ivec __attribute__((vector_size(4 * kLanes)));

template <typename To, typename From>
To convert(From v) {  // a float or int, or a vector of them, to the same number of another type
  if constexpr (std::is_arithmetic_v<From>)
    return To(v);
  else
    return __builtin_convertvector(v, To);
}

// exp(x) for x <= 0, of a float (F, I = float, int32_t) or a vector of them (fvec, ivec), in plain
// arithmetic: 2^(x log2 e) as 2^n times a degree-6 polynomial for 2^f, f in [0, 1); relative error
// ~2e-7, below a bf16 probability's rounding.
template <typename F = float, typename I = int32_t>
F exp_nonpositive(F x) {
  const F t = (x < -87.f ? F{} - 87.f : x) * 1.44269504f;
  const I n = convert<I>(t + 128.f) - 128;  // floor: truncation of a positive number
  const F f = t - convert<F>(n);
  F p = f * 1.5353362e-4f + 1.3398874e-3f;
  p = p * f + 9.6184373e-3f;
  p = p * f + 5.5503325e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314720e-1f;
  p = p * f + 1.f;
  const I bits = (n + 127) << 23;
  F two_n;
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

ffi::Error AttendOneQuery(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::S32> layer,
                          ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::PRED> keep, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t L = kd.size() == 5 ? kd[0] : 1, at = kd.size() - 4;
  if (qd.size() != 4 || kd.size() < 4 || kd.size() > 5 || qd[0] != kd[at] || qd[1] != kd[at + 1] ||
      qd[3] != kd[at + 3] || k.element_count() != v.element_count())
    return ffi::Error::InvalidArgument("cpu attention: expected q [B, Kv, G, D] and k/v [(L,) B, Kv, S, D]");
  const int64_t i = layer.element_count() == 1 ? layer.typed_data()[0] : -1;
  if (i < 0 || i >= L) return ffi::Error::InvalidArgument("cpu attention: layer index out of range");
  const int64_t heads = qd[0] * qd[1], G = qd[2], D = qd[3], S = kd[at + 2], kv = qd[1];
  const auto* qp = reinterpret_cast<const uint16_t*>(q.untyped_data());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.untyped_data()) + i * heads * S * D;  // the layer's cache
  const auto* vp = reinterpret_cast<const uint16_t*>(v.untyped_data()) + i * heads * S * D;
  const bool* mp = keep.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, heads, [=](int64_t h) {
    attend(qp + h * G * D, kp + h * S * D, vp + h * S * D, mp + (h / kv) * S, scale, op + h * G * D, G, S, D);
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------- products of bf16 pairs
// The inner loop of the prefill's attention and of the product of many rows: a pair of bf16 (two
// consecutive k) of one row, broadcast, against the same pair of 16 rows of the other operand, packed
// side by side in one vector ("pairs" below are such 32-bit words; bf16 data read as uint32).
#if defined(VLM_AVX512)
struct PairDot {  // 16 f32 lanes += a.lo * b.lo + a.hi * b.hi over bf16 pairs (vdpbf16ps, or two FMAs)
  using Acc = __m512;
  using Pairs = Bf16::Vec;
  static Acc zero() { return _mm512_setzero_ps(); }
#if defined(VLM_AVX512_BF16)
  static Pairs load(const uint32_t* p) { return (Pairs)_mm512_loadu_si512(p); }
  static Pairs broadcast(uint32_t pair) { return (Pairs)_mm512_set1_epi32(int(pair)); }
#else
  static Pairs load(const uint32_t* p) { return split_bf16_pairs(_mm512_loadu_si512(p)); }
  static Pairs broadcast(uint32_t pair) { return split_bf16_pairs(_mm512_set1_epi32(int(pair))); }
  static Pairs broadcast(const SplitPair& pair) { return {_mm512_set1_ps(pair.even), _mm512_set1_ps(pair.odd)}; }
#endif
  static Acc madd(Acc acc, Pairs a, Pairs b) { return Bf16::madd(acc, a, b); }
  static Acc load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Acc acc) { _mm512_storeu_ps(p, acc); }
  static Acc set1(float f) { return _mm512_set1_ps(f); }
  static Acc fmadd(Acc a, Acc b, Acc acc) { return _mm512_fmadd_ps(a, b, acc); }
};
#elif defined(VLM_AVX2)
struct PairDot {  // the same in two 8-lane halves: bf16 pairs split into f32, two FMAs (exact products)
  struct Acc {
    __m256 lo, hi;
  };
  struct Pairs {
    Bf16Pairs lo, hi;
  };
  static Acc zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Pairs load(const uint32_t* p) {
    return {split_bf16_pairs(_mm256_loadu_si256((const __m256i*)p)), split_bf16_pairs(_mm256_loadu_si256((const __m256i*)(p + 8)))};
  }
  static Pairs broadcast(uint32_t pair) {
    const Bf16Pairs s = split_bf16_pairs(_mm256_set1_epi32(int(pair)));
    return {s, s};
  }
  static Acc madd(Acc acc, Pairs a, Pairs b) { return {Bf16::madd(acc.lo, a.lo, b.lo), Bf16::madd(acc.hi, a.hi, b.hi)}; }
  static Acc load_f32(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, Acc acc) { _mm256_storeu_ps(p, acc.lo), _mm256_storeu_ps(p + 8, acc.hi); }
  static Acc set1(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
  static Acc fmadd(Acc a, Acc b, Acc acc) { return {_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)}; }
};
#else
struct PairDot {  // the same in portable vector code
  typedef float Acc __attribute__((vector_size(64)));
  typedef uint32_t Pairs __attribute__((vector_size(64)));
  static Acc zero() { return Acc{}; }
  static Pairs load(const uint32_t* p) {
    Pairs v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static Pairs broadcast(uint32_t pair) { return Pairs{} + pair; }
  static Acc madd(Acc acc, Pairs a, Pairs b) {
    const Pairs hi = Pairs{} + 0xFFFF0000u;
    Acc alo, ahi, blo, bhi;
    const Pairs al = a << 16, ah = a & hi, bl = b << 16, bh = b & hi;
    std::memcpy(&alo, &al, 64), std::memcpy(&ahi, &ah, 64), std::memcpy(&blo, &bl, 64), std::memcpy(&bhi, &bh, 64);
    return acc + alo * blo + ahi * bhi;
  }
  static Acc load_f32(const float* p) {
    Acc v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, Acc acc) { std::memcpy(p, &acc, sizeof acc); }
};
#endif

// o[r, 16c + l] (+)= sum over t < T of a[r, t] . b[t, c, l] for R rows and C vectors: row r's pair t
// (at a + r * as + t) broadcast against 16 packed pairs (vector c of pair t, at b + t * bt + c * bc),
// one f32 accumulator vector per (r, c); o's rows `os` floats apart. `a`'s pairs are bf16 bits, or
// (AVX-512 without BF16) already split into f32; so may `b`'s be (B = float: pair t's even elements,
// then its odd ones bt / 2 floats later).
template <int R, int C, typename A, typename B>
void pair_tile(const A* a, int64_t as, const B* b, int64_t bt, int64_t bc, int64_t T, float* o, int64_t os,
               bool accumulate) {
  PairDot::Acc acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = accumulate ? PairDot::load_f32(o + r * os + c * 16) : PairDot::zero();
#if defined(VLM_SPLIT)
  if constexpr (std::is_same_v<B, float>) {
    // the even elements, then the odd ones: C vectors of b and R x C accumulators fit the registers
    // (both halves at once spilled 3 of 24 accumulators on every pair); the same FMAs in the same order
    for (int64_t t = 0; t < T; ++t)
      for (int h = 0; h < 2; ++h) {
        PairDot::Acc bv[C];
        for (int c = 0; c < C; ++c) bv[c] = PairDot::load_f32(b + t * bt + h * bt / 2 + c * bc);
        for (int r = 0; r < R; ++r) {
          const PairDot::Acc av = PairDot::set1(h ? a[r * as + t].odd : a[r * as + t].even);
          for (int c = 0; c < C; ++c) acc[r][c] = PairDot::fmadd(bv[c], av, acc[r][c]);
        }
      }
  } else
#endif
  {
    for (int64_t t = 0; t < T; ++t) {
      PairDot::Pairs bv[C];
      for (int c = 0; c < C; ++c) bv[c] = PairDot::load(b + t * bt + c * bc);
      for (int r = 0; r < R; ++r) {
        const PairDot::Pairs av = PairDot::broadcast(a[r * as + t]);
        for (int c = 0; c < C; ++c) acc[r][c] = PairDot::madd(acc[r][c], bv[c], av);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) PairDot::store(o + r * os + c * 16, acc[r][c]);
}

// pair_tile<r, c> for r <= R, c <= C known at run time (the edges).
template <int R, int C, typename A, typename B>
void pair_any(int64_t r, int64_t c, const A* a, int64_t as, const B* b, int64_t bt, int64_t bc, int64_t T,
              float* o, int64_t os, bool accumulate) {
  if constexpr (R > 1)
    if (r < R) return pair_any<R - 1, C>(r, c, a, as, b, bt, bc, T, o, os, accumulate);
  if constexpr (C > 1)
    if (c < C) return pair_any<R, C - 1>(r, c, a, as, b, bt, bc, T, o, os, accumulate);
  pair_tile<R, C>(a, as, b, bt, bc, T, o, os, accumulate);
}

#if defined(VLM_AMX)
// AMX (Intel Sapphire Rapids and later): 8 tile registers of 16 rows x 64 bytes; one tdpbf16ps adds
// a [16 x 16 pairs] bf16 tile times a [16 pairs x 16] one (pairs interleaved: the packed layouts above)
// into a 16 x 16 f32 tile. Linux hands out AMX's 8 KB of state only on request, once per process
// (arch_prctl); each thread loads the tile configuration while it uses them.
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) bytes_per_row[t] = 64, rows[t] = 16;
  }
};

struct Tiles {  // every tile 16 x 64 bytes while in scope
  Tiles() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~Tiles() { _tile_release(); }
};

// pair_tile's o = a . b in AMX tiles, for 16 * row_tiles rows of a (each read and written whole: a's and
// o's buffers must hold them) and C vectors of b; T a multiple of 16. In 2 x 2 blocks of o's tiles (0-3),
// two tiles of a (4-5) and two of b (6-7) a step: each load serves two products.
void amx_pairs(int64_t row_tiles, int64_t C, const uint32_t* a, int64_t as, const uint32_t* b, int64_t bt, int64_t bc,
               int64_t T, float* o, int64_t os) {
  for (int64_t r = 0; r < row_tiles; r += 2)
    for (int64_t c = 0; c < C; c += 2) {
      const bool r2 = r + 1 < row_tiles, c2 = c + 1 < C;
      const uint32_t *a0 = a + r * 16 * as, *b0 = b + c * bc;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t t = 0; t < T; t += 16) {  // (the tile intrinsics are macros: one statement each)
        _tile_loadd(4, a0 + t, as * 4);
        _tile_loadd(6, b0 + t * bt, bt * 4);
        _tile_dpbf16ps(0, 4, 6);
        if (c2) {
          _tile_loadd(7, b0 + bc + t * bt, bt * 4);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (r2) {
          _tile_loadd(5, a0 + 16 * as + t, as * 4);
          _tile_dpbf16ps(2, 5, 6);
          if (c2) _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* o0 = o + r * 16 * os + c * 16;
      _tile_stored(0, o0, os * 4);
      if (c2) _tile_stored(1, o0 + 16, os * 4);
      if (r2) _tile_stored(2, o0 + 16 * os, os * 4);
      if (r2 && c2) _tile_stored(3, o0 + 16 * os + 16, os * 4);
    }
}
#else  // no AMX: never called
inline bool amx_ready() { return false; }
struct Tiles {};
inline void amx_pairs(int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, float*,
                      int64_t) {}
#endif

// ---------------------------------------------------------------- attention over key ranges (prefill)
// softmax(q k^T * scale) v where each query attends to one contiguous range of key slots [lo, hi): the
// vision tower's attention (each patch over its own image's patches) and a prompt's (causal, from the
// row's first real slot). q [B, T, H, D], k/v [B, Hk, S, D] (the KV cache's layout; H a multiple of Hk:
// grouped-query), lo/hi [B, T] int32 -> out [B, T, H, D] bf16, D even and at most 128. Numerics as
// vlm.ops.attention's XLA path: scores in f32, probabilities rounded to bf16, their sum of V in f32,
// rounded to bf16. Work: each (row, kv head)'s K and V are first packed so that one vector op takes a
// pair of bf16 from each of 16 keys (or 16 dims) against a broadcast pair of q (or of probabilities);
// then each task takes a block of query rows of one (row, head), scores only the keys of their ranges,
// softmaxes them in place and sums V.

constexpr int kKeys = 16;       // keys per packed K block: one vector of scores
constexpr int kQueryRows = 32;  // query rows per task

// Tiles of pair_tile: ~24 accumulators in AVX-512's 32 registers; 8 in AVX2's 16 (b's pairs take 4 halves).
#if defined(VLM_AVX2)
constexpr int kScoreRows = 4, kScoreKeys = 1;  // rows of q x vectors of 16 keys
#else
constexpr int kScoreRows = 8, kScoreKeys = 3;
#endif

// o = probs . V for all `rows` rows (T key pairs, V packed [pair][16C dims]).
template <int C>
void values(int64_t rows, const uint32_t* probs, int64_t ps, const uint32_t* vp, int64_t T, float* o) {
#if defined(VLM_AVX2)
  constexpr int R = 4, Cs = 1;  // rows x vectors of 16 dims a tile
#else
  constexpr int R = std::max(1, std::min(8, 24 / C)), Cs = C;
#endif
  for (int64_t r = 0; r < rows; r += R)
    for (int c = 0; c < C; c += Cs)
      pair_any<R, Cs>(std::min<int64_t>(R, rows - r), Cs, probs + r * ps, ps, vp + 16 * c, 16 * C, 16, T,
                      o + r * C * 16 + 16 * c, C * 16, false);
}

// probs[j + shift] = softmax(s[a:b] * scale)[j - a], rounded to bf16, for j in [a, b); zero elsewhere in
// probs[:W]. s[a:b] is overwritten; up to 15 floats past b are read, never changed. In 16 lanes (vectors:
// GCC does not vectorize the exp's loop by itself) that start at a: the sum's order, like all
// else here, depends only on the row's own range, not on where it sits (its padding, the images before).
void softmax_row(float* s, uint16_t* probs, int64_t a, int64_t b, int64_t shift, int64_t W, float scale) {
  constexpr int parts = 16 / kLanes;  // lane l of part p is lane p * kLanes + l of the 16
  ivec lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  const auto load = [&](int64_t j) {
    fvec v;
    std::memcpy(&v, s + j, sizeof v);
    return v * scale;
  };
  const auto inside = [&](int64_t j) { return lane + int32_t(j) < int32_t(b); };
  fvec top[parts], total[parts];
  for (int p = 0; p < parts; ++p) top[p] = fvec{} - INFINITY, total[p] = fvec{};
  for (int64_t j = a; j < b; j += 16)
    for (int64_t p = 0, i = j; p < parts; ++p, i += kLanes) top[p] = (inside(i) & (load(i) > top[p])) ? load(i) : top[p];
  float m = -INFINITY;
  for (int p = 0; p < parts; ++p)
    for (int l = 0; l < kLanes; ++l) m = std::max(m, top[p][l]);
  for (int64_t j = a; j < b; j += 16)
    for (int64_t p = 0, i = j; p < parts; ++p, i += kLanes) {
      const fvec e = inside(i) ? exp_nonpositive<fvec, ivec>(load(i) - m) : fvec{};
      fvec kept;
      std::memcpy(&kept, s + i, sizeof kept);
      kept = inside(i) ? e : kept;  // the floats past b (another row's) stay as they are
      std::memcpy(s + i, &kept, sizeof kept);
      total[p] += e;
    }
  float sum = 0.f;
  for (int p = 0; p < parts; ++p)
    for (int l = 0; l < kLanes; ++l) sum += total[p][l];
  std::fill(probs, probs + W, 0);
#pragma omp simd
  for (int64_t j = a; j < b; ++j) probs[j + shift] = f32_to_bf16(s[j] / sum);
}

using ValuesFn = void (*)(int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t, float*);
constexpr ValuesFn kValues[] = {values<1>, values<2>, values<3>, values<4>, values<5>, values<6>, values<7>, values<8>};

ffi::Error RangeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                          ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, float scale,
                          ffi::ResultBuffer<ffi::BF16> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()) || kd[0] != qd[0] ||
      kd[3] != qd[3] || qd[2] % kd[1] != 0 || qd[3] % 2 != 0 || qd[3] > 128 ||
      lo.element_count() != qd[0] * qd[1] || hi.element_count() != qd[0] * qd[1])
    return ffi::Error::InvalidArgument("cpu attention: expected q [B, T, H, D], k/v [B, Hk, S, D] (D even, <= 128), "
                                       "lo/hi [B, T]");
  const int64_t B = qd[0], T = qd[1], H = qd[2], D = qd[3], Hk = kd[1], S = kd[2], group = H / Hk;
  const int64_t P = D / 2, C = (D + 15) / 16, Dp = 16 * C, blocks = (S + kKeys - 1) / kKeys, pairs = blocks * kKeys / 2;
  const auto* qw = reinterpret_cast<const uint32_t*>(q.untyped_data());  // [B, T, H, P] bf16 pairs
  const auto* kw = reinterpret_cast<const uint32_t*>(k.untyped_data());  // [B, Hk, S, P]
  const auto* vh = reinterpret_cast<const uint16_t*>(v.untyped_data());  // [B, Hk, S, D]
  const int32_t *lp = lo.typed_data(), *hp = hi.typed_data();
  auto* op = reinterpret_cast<uint16_t*>(out->untyped_data());
  for (int64_t i = 0; i < B * T; ++i)
    if (!(0 <= lp[i] && lp[i] < hp[i] && hp[i] <= S))
      return ffi::Error::InvalidArgument("cpu attention: every query needs a key range 0 <= lo < hi <= S");

  // K per (row, kv head): [block][pair p][16 keys], zero past S. V: [key pair][Dp dims] (a pair of keys
  // interleaved in each 32-bit word), zero past S and D, twice: pairs (2t, 2t + 1) and (2t - 1, 2t), so
  // that every range's sums of V take its keys in pairs from its own first key.
  // AMX tiles take 16 pairs of q . k (D a multiple of 32: Qwen3-VL's 64 and 128) and sum V 16 key pairs at
  // a time: probabilities padded with zeros to whole tiles, and V's pairs readable (zero) that far
  const bool amx = P % 16 == 0 && amx_ready();
  const int64_t vpairs = pairs + (amx ? 16 : 1);
  std::vector<uint32_t> kp(B * Hk * blocks * P * kKeys), vp(2 * B * Hk * vpairs * Dp);
  parallel_for(pool, B * Hk, [&](int64_t bk) {
    uint32_t* kb = kp.data() + bk * blocks * P * kKeys;
    const uint32_t* ks = kw + bk * S * P;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t l = 0; l < kKeys; ++l) kb[(b * P + p) * kKeys + l] = b * kKeys + l < S ? ks[(b * kKeys + l) * P + p] : 0;
    const uint16_t* vs = vh + bk * S * D;
    const auto value = [&](int64_t key, int64_t d) -> uint32_t { return 0 <= key && key < S && d < D ? vs[key * D + d] : 0; };
    for (int64_t odd = 0; odd < 2; ++odd) {
      uint32_t* vo = vp.data() + (odd * B * Hk + bk) * vpairs * Dp;
      for (int64_t t = 0; t < vpairs; ++t)
        for (int64_t d = 0; d < Dp; ++d) vo[t * Dp + d] = value(2 * t - odd, d) | value(2 * t + 1 - odd, d) << 16;
    }
  });

  const int64_t query_blocks = (T + kQueryRows - 1) / kQueryRows;  // tasks: (row, head, query block)
  parallel_for(pool, B * H * query_blocks, [&](int64_t task) {
    const int64_t b = task / (H * query_blocks), h = task / query_blocks % H, i0 = task % query_blocks * kQueryRows;
    const int64_t rows = std::min<int64_t>(kQueryRows, T - i0), bk = b * Hk + h / group;
    const int32_t *rlo = lp + b * T + i0, *rhi = hp + b * T + i0;
    const int64_t first = *std::min_element(rlo, rlo + rows) / kKeys;
    const int64_t last = (*std::max_element(rhi, rhi + rows) + kKeys - 1) / kKeys;
    const int64_t W = (last - first) * kKeys;  // keys scored from key first * kKeys
    const int64_t Tv = amx ? (W / 2 + 1 + 15) / 16 * 16 : W / 2 + 1, ps = 2 * Tv;  // key pairs (+ a shift) a row
    thread_local std::vector<float> scores, o;
    thread_local std::vector<uint16_t> probs;
    thread_local std::vector<uint32_t> qs;
    // AMX reads and writes whole tiles of 16 rows: room for the rows past the task's
    scores.resize(kQueryRows * W + 16), probs.resize((kQueryRows + 16) * ps), o.resize((kQueryRows + 16) * Dp);
    const uint32_t* kb = kp.data() + (bk * blocks + first) * P * kKeys;
    const uint32_t* q = qw + ((b * T + i0) * H + h) * P;  // the task's rows, H * P words apart
    std::optional<Tiles> tiles;
    if (amx) {  // q's rows copied into whole tiles (zero past the last)
      tiles.emplace();
      qs.assign(kQueryRows * P, 0);
      for (int64_t r = 0; r < rows; ++r) std::copy(q + r * H * P, q + r * H * P + P, qs.data() + r * P);
      amx_pairs((rows + 15) / 16, last - first, qs.data(), P, kb, kKeys, P * kKeys, P, scores.data(), W);
    } else {
      for (int64_t r = 0; r < rows; r += kScoreRows)
        for (int64_t j = 0; j < last - first; j += kScoreKeys)
          pair_any<kScoreRows, kScoreKeys>(std::min<int64_t>(kScoreRows, rows - r),
                                           std::min<int64_t>(kScoreKeys, last - first - j), q + r * H * P, H * P,
                                           kb + j * P * kKeys, kKeys, P * kKeys, P, scores.data() + r * W + j * kKeys, W,
                                           false);
    }
    for (int64_t r = 0; r < rows; ++r)  // a range from an odd key: its probabilities one later, odd pairs of V
      softmax_row(scores.data() + r * W, probs.data() + r * ps, rlo[r] - first * kKeys, rhi[r] - first * kKeys,
                  rlo[r] & 1, ps, scale);
    for (int64_t r0 = 0, r1; r0 < rows; r0 = r1) {  // runs of rows whose ranges start on the same parity
      for (r1 = r0 + 1; r1 < rows && (rlo[r1] & 1) == (rlo[r0] & 1);) ++r1;
      const uint32_t* v = vp.data() + (((rlo[r0] & 1) * B * Hk + bk) * vpairs + first * kKeys / 2) * Dp;
      const auto* p = reinterpret_cast<const uint32_t*>(probs.data() + r0 * ps);
      if (amx)
        amx_pairs((r1 - r0 + 15) / 16, C, p, Tv, v, Dp, 16, Tv, o.data() + r0 * Dp, Dp);
      else
        kValues[C - 1](r1 - r0, p, Tv, v, Tv, o.data() + r0 * Dp);
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) op[((b * T + i0 + r) * H + h) * D + d] = f32_to_bf16(o[r * Dp + d]);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------- product of many rows (prefill)
// y = x @ w.T for bf16 x [M, K] with many rows (a prompt, the vision tower's patches) and w [N, K]
// (Hugging Face layout) -> f32 [M, N]. x is packed once, transposed into blocks of 64 rows of bf16 pairs
// ([M/64][K/2][64]), so that pair_tile takes one pair of a weight row, broadcast, against the same pair
// of 64 rows of x: the weights are read in place, in their own layout, where a generic GEMM (XLA's)
// first repacks the whole weight matrix, which is N/M times larger than x. A task is kTaskRows rows of w
// against up to 256 rows of x, its accumulators in a per-thread scratch [kTaskRows][256] across K's
// blocks, written to y at the end; each block of K of x (in L2) serves all of the task's weight rows, in
// tiles of kWeightRows (K's blocks looped inside each tile instead re-read all of x from L3 for every
// tile: ~1.3x slower on a 2-core Xeon). Only the rows `live` names are computed (a bucket's
// padding is not): x's M rows are G groups of M/G (a prompt's rows, one image batch), and group g needs
// rows [live[g][0], live[g][1]); the others are packed out, and their rows of y are zero. The last block of
// 64 rows runs only its vectors of 16 rows that hold live rows.
constexpr int kWeightRows = 6;  // x 4 vectors of 16 rows of x: 24 accumulators (AVX2: x 1 vector, 12)
constexpr int kXBlock = 64;
#if defined(VLM_AVX2)
constexpr int kXVectors = 1;  // vectors of 16 rows of x a tile: 16 registers hold 6 x 2 accumulators
#else
constexpr int kXVectors = kXBlock / 16;
#endif
constexpr int kTaskRows = 16 * kWeightRows;  // 96 floats of a row of y: 6 cache lines
constexpr int kChunkBlocks = 4;  // blocks of x a task takes: 256 rows

// x packed: a pair of bf16 of 64 rows as 64 words ([block][pair][64]), or, on AVX-512 without BF16,
// split into f32 ([block][pair][64 even elements, 64 odd ones]), so that pair_tile only loads and FMAs.
#if defined(VLM_SPLIT)
using PackedX = float;
constexpr int kPackedPair = 2 * kXBlock;
inline void pack_pair(float* at, uint32_t pair) {
  const SplitPair s = split_pair(pair);
  at[0] = s.even, at[kXBlock] = s.odd;
}
#else
using PackedX = uint32_t;
constexpr int kPackedPair = kXBlock;
inline void pack_pair(uint32_t* at, uint32_t pair) { *at = pair; }
#endif
// Rows of x side by side for each pair: all 64 of a block, or, in the AMX build, runs of 16
// ([block][4 runs][K/2][16 rows]), so that one AMX tile of x (16 pairs of 16 rows) is 1 KB in one piece
// (from [block][K/2][64], a tile took 16 rows 256 bytes apart).
#if defined(VLM_AMX)
constexpr int kXRun = 16;
#else
constexpr int kXRun = kXBlock;
#endif
constexpr int kPairStride = kPackedPair / (kXBlock / kXRun);  // from a pair of a run of rows to the next pair
// where row m of a block (0 <= m < 64), pair p, lies from the block's start
inline int64_t packed_at(int64_t m, int64_t p, int64_t K2) {
  return m / kXRun * K2 * kPairStride + p * kPairStride + m % kXRun;
}

#if defined(VLM_AVX512)
// v[i][j] -> v[j][i] for 16 vectors of 16 floats: pairs of rows interleaved, then groups of four, then the
// 4 x 4 blocks of 128-bit lanes.
inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]), t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  for (int i = 0; i < 16; i += 4) {  // u[4g + c], lane l: rows 4g..4g+3 of column 4l + c
    v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 ab_lo = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x44), ab_hi = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x44), cd_hi = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88), t[4 + c] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88), t[12 + c] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}
#endif

// y[rows[m], n] = acc[n - n0][m - m0] for m in [m0, m1), n in [n0, n1): a task's accumulators (weight rows
// by rows of x) into y's rows; in 16 x 16 blocks transposed in registers where it can (a scalar loop took
// ~15 % of an AMX product).
void write_rows(const float* acc, int64_t cols, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int64_t* rows,
                float* y, int64_t N) {
  int64_t n = n0;
#if defined(VLM_AVX512)
  for (; n + 16 <= n1; n += 16)
    for (int64_t m = m0; m < m1; m += 16) {  // acc has whole blocks of 64 columns: reading past m1 is safe
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(acc + (n - n0 + i) * cols + m - m0);
      transpose16(v);
      for (int64_t j = 0; j < std::min<int64_t>(16, m1 - m); ++j) _mm512_storeu_ps(y + rows[m + j] * N + n, v[j]);
    }
#endif
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t i = n; i < n1; ++i) y[rows[m] * N + i] = acc[(i - n0) * cols + m - m0];
}

constexpr int64_t kAmxPairs = 128;  // AMX: pairs of k a block (Matmul's kc): two 32-row copies fit L1 (16 KB each)

#if defined(VLM_AMX)
// The AMX path of a Matmul task: y's tile [16 weight rows][16 rows of x] in f32 is one tile register, and
// one tdpbf16ps adds a tile of 16 weight rows x 16 pairs of k (copied into whole tiles first) times 16
// pairs of 16 rows of x (packed in runs of 16 rows: AMX's pair-interleaved layout already). Tiles 0-3 hold
// a 32 x 32 block of y, 4-5 two tiles of weights, 6-7 two of x: each tile load serves two products.

// acc[n * cols + m] (+)= w[n] . x[m] over pairs [k0, k0 + T) for n in [0, rows_w), a multiple of 32, and
// m in [0, live), a multiple of 32 (at most cols, acc's row length); x packed, from block b0 on.
void amx_block(const uint32_t* w, int64_t K2, const uint32_t* xt, int64_t b0, int64_t k0, int64_t T, int64_t rows_w,
               float* acc, int64_t cols, int64_t live, bool accumulate) {
  // 32 weight rows' block of k, copied into whole tiles ([T/16][32 rows][16 pairs]): in place, rows K2
  // words apart fell into the same few L1 sets and came from L2 at every tile load. The next 32 rows are
  // copied a share at each step of the current ones, so that their reads overlap the tiles' work (one
  // copy before the steps: 5-15 % slower).
  alignas(64) thread_local uint32_t wbuf[2][32 * kAmxPairs];
  const auto copy = [&](uint32_t* to, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t t = 0; t < T; t += 16)
        _mm512_store_si512(to + t * 32 + r * 16, _mm512_loadu_si512(w + (n + r) * K2 + k0 + t));
  };
  copy(wbuf[0], 0, 0, 32);
  const int64_t ys = cols * sizeof(float), steps = live / 32;
  for (int64_t n = 0, i = 0; n < rows_w; n += 32, i ^= 1) {
    const uint32_t* a = wbuf[i];
    for (int64_t m = 0, step = 0; m < live; m += 32, ++step) {
      const int64_t r0 = step * 32 / steps, r1 = (step + 1) * 32 / steps;  // this step's share of 32 rows
      if (n + 32 < rows_w) copy(wbuf[i ^ 1], n + 32, r0, r1);
      // and the rows after those on their way into L2 (else the next block of k's first rows): in a chain
      // of 2B-shaped weights from memory 9-15 % faster
      const bool far = n + 64 < rows_w;
      const uint32_t* ahead = far ? w + (n + 64) * K2 + k0 : w + k0 + T;
      for (int64_t r = r0, T2 = far ? T : std::min<int64_t>(T, K2 - k0 - T); r < r1; ++r)
        for (int64_t t = 0; t < T2; t += 16) _mm_prefetch((const char*)(ahead + r * K2 + t), _MM_HINT_T1);
      float* y = acc + n * cols + m;
      if (accumulate) {  // (the tile intrinsics are macros: one statement each)
        _tile_loadd(0, y, ys);
        _tile_loadd(1, y + 16, ys);
        _tile_loadd(2, y + 16 * cols, ys);
        _tile_loadd(3, y + 16 * cols + 16, ys);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      const uint32_t* b = xt + ((b0 * kXBlock + m) / kXRun * K2 + k0) * kXRun;  // runs of 16 rows (kXRun)
      for (int64_t t = 0; t < T; t += 16) {  // each load just before its first product (tiles are not
        _tile_loadd(4, a + t * 32, 64);      // renamed: a load waits for the products reading the tile;
        _tile_loadd(6, b + t * kXRun, 64);   // all four loads first: 4-10 % slower)
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b + (K2 + t) * kXRun, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a + t * 32 + 256, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, y, ys);
      _tile_stored(1, y + 16, ys);
      _tile_stored(2, y + 16 * cols, ys);
      _tile_stored(3, y + 16 * cols + 16, ys);
    }
  }
}
#endif

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> live, ffi::Buffer<ffi::S32> layer,
                  ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y) {
  const auto w = layer_of<ffi::BF16>(weights, layer);
  if (!w.has_value()) return w.error();
  const auto wd = w->dimensions();
  if (wd.size() != 2 || wd[1] % 2 != 0 || x.element_count() % wd[1] != 0)
    return ffi::Error::InvalidArgument("cpu matmul: expected x [M, K] and w [N, K] with K even");
  const int64_t N = wd[0], K2 = wd[1] / 2, M = x.element_count() / wd[1], G = live.element_count() / 2;
  if (G < 1 || M % G != 0) return ffi::Error::InvalidArgument("cpu matmul: expected live [G, 2] with G dividing M");
  const auto* xw = reinterpret_cast<const uint32_t*>(x.untyped_data());
  const auto* ww = reinterpret_cast<const uint32_t*>(w->untyped_data());
  float* yp = y->typed_data();
  std::vector<int64_t> rows;  // the live rows, in order; the others' rows of y are zero
  const int32_t* lp = live.typed_data();
  for (int64_t g = 0, T = M / G; g < G; ++g) {
    const int64_t lo = std::clamp<int64_t>(lp[2 * g], 0, T), hi = std::clamp<int64_t>(lp[2 * g + 1], lo, T);
    std::fill(yp + g * T * N, yp + (g * T + lo) * N, 0.f);
    std::fill(yp + (g * T + hi) * N, yp + (g + 1) * T * N, 0.f);
    for (int64_t r = lo; r < hi; ++r) rows.push_back(g * T + r);
  }
  const int64_t R = rows.size(), blocks = (R + kXBlock - 1) / kXBlock;
  std::vector<PackedX> xt(blocks * K2 * kPackedPair);  // x packed, zero past R
  parallel_for(pool, blocks, [&](int64_t b) {
    PackedX* out = xt.data() + b * K2 * kPackedPair;
    int64_t p0 = 0;
#if defined(VLM_AVX512) && !defined(VLM_SPLIT)
    // 16 rows x 16 pairs transposed in registers into 16 rows side by side for each pair. Pair by pair (the
    // loop below) the packing took ~5 ms of a 2B vision fc2's 25 ms (896 x 4096 -> 1024; now 20.5 ms), and a
    // warm 2B image prefill took 4.28-4.32 s instead of 4.09-4.18 (medians of 6, 2-core Zen 4)
    for (; p0 + 16 <= K2; p0 += 16)
      for (int64_t m = 0; m < kXBlock; m += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = b * kXBlock + m + i;
          v[i] = row < R ? _mm512_loadu_ps(xw + rows[row] * K2 + p0) : _mm512_setzero_ps();
        }
        transpose16(v);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + packed_at(m, p0 + j, K2), v[j]);
      }
#endif
    for (; p0 < K2; p0 += 16)  // 16 pairs of the block's 64 rows at a time: 4-8 KB, in L1
      for (int64_t m = 0; m < kXBlock; ++m) {
        const int64_t row = b * kXBlock + m;
        const uint32_t* in = row < R ? xw + rows[row] * K2 : nullptr;
        for (int64_t p = p0; p < std::min(K2, p0 + 16); ++p) pack_pair(out + packed_at(m, p, K2), in ? in[p] : 0);
      }
  });
  // A task: kTaskRows rows of w (whole cache lines of y: threads never write the same line) against
  // kChunkBlocks blocks of x (256 rows), K in blocks of kc pairs (256 KB of packed x: it stays in L2).
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks, col_tasks = (N + kTaskRows - 1) / kTaskRows;
  const bool amx = K2 % 16 == 0 && amx_ready();  // tiles take 16 pairs of k; weight rows in 32s, the rest below
  const int64_t kc = amx ? kAmxPairs : 256 * 1024 / sizeof(PackedX) / (kChunkBlocks * kPackedPair);
  parallel_for(pool, col_tasks * chunks, [&](int64_t task) {
    const int64_t col = task % col_tasks;  // chunk by chunk: both threads share a chunk of x in L2
    const int64_t b0 = task / col_tasks * kChunkBlocks, b1 = std::min(blocks, b0 + kChunkBlocks), m0 = b0 * kXBlock;
    const int64_t nt = col * kTaskRows, n1 = std::min(N, nt + kTaskRows), cols = (b1 - b0) * kXBlock;
    thread_local std::vector<float> acc;  // [kTaskRows][cols]: 96 KB, in L2 with the block of x
    acc.resize(kTaskRows * cols);
    int64_t n_rest = nt;  // the weight rows pair_tile runs
#if defined(VLM_AMX)
    if (amx) {
      const Tiles tiles;
      n_rest = nt + (n1 - nt) / 32 * 32;
      for (int64_t k0 = 0; k0 < K2; k0 += kc)
        amx_block(ww + nt * K2, K2, xt.data(), b0, k0, std::min(kc, K2 - k0), n_rest - nt, acc.data(), cols,
                  std::min(cols, (R - m0 + 31) / 32 * 32), k0 > 0);  // the last block: its runs of live rows
    }
#endif
    for (int64_t k0 = 0; k0 < K2; k0 += kc) {  // each block of x serves all the task's weight rows
      const int64_t T = std::min(kc, K2 - k0);
      for (int64_t n0 = n_rest; n0 < n1; n0 += kWeightRows) {
        const int64_t rows_w = std::min<int64_t>(kWeightRows, N - n0);
        if (n0 + 2 * kWeightRows <= N)  // the next tile's weights, on their way from memory meanwhile
          for (int64_t r = 0; r < kWeightRows; ++r)
            for (int64_t t = 0; t < T; t += 16) __builtin_prefetch(ww + (n0 + kWeightRows + r) * K2 + k0 + t, 0, 1);
#if defined(VLM_SPLIT)
        // the tile's weight pairs split into f32 once for all its blocks of x, not at every broadcast
        thread_local std::vector<SplitPair> split;
        split.resize(kWeightRows * kc);
        for (int64_t r = 0; r < rows_w; ++r)
          for (int64_t t = 0; t < T; ++t) split[r * kc + t] = split_pair(ww[(n0 + r) * K2 + k0 + t]);
        const SplitPair* a = split.data();
        const int64_t as = kc;
#else
        const uint32_t* a = ww + n0 * K2 + k0;
        const int64_t as = K2;
#endif
        float* o = acc.data() + (n0 - nt) * cols;
        for (int64_t b = b0; b < b1; ++b) {  // the last block: only its vectors of 16 rows that hold live rows
          const int64_t vectors = std::min<int64_t>(kXBlock, R - b * kXBlock + 15) / 16;
          for (int64_t c = 0; c < vectors; c += kXVectors)
            pair_any<kWeightRows, kXVectors>(rows_w, std::min<int64_t>(kXVectors, vectors - c), a, as,
                                             xt.data() + b * K2 * kPackedPair + k0 * kPairStride + packed_at(16 * c, 0, K2),
                                             kPairStride, packed_at(16, 0, K2), T, o + (b - b0) * kXBlock + 16 * c, cols,
                                             k0 > 0);
        }
      }
    }
    write_rows(acc.data(), cols, m0, std::min(R, m0 + cols), nt, n1, rows.data(), yp, N);
  });
  return ffi::Error::Success();
}

}  // namespace

// bf16 x bf16 -> f32, and int8 x int8 -> int32 (vlm/quantize.py's W8A8 product, exactly).
// x, the layer's index, then the weights (every layer's in a loop over layers; else one array).
#define VLM_BINDING(IN, OUT)                                                                                   \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<IN>>().Arg<ffi::Buffer<ffi::S32>>().RemainingArgs() \
      .Ret<ffi::Buffer<OUT>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatvecBf16, (Matvec<Bf16, ffi::BF16, ffi::F32>), VLM_BINDING(ffi::BF16, ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatvecInt8, (Matvec<Int8, ffi::S8, ffi::S32>), VLM_BINDING(ffi::S8, ffi::S32));
// attention: bf16 q (one query: then the layer's index), bf16 k and v, which keys each query takes, the scale.
#define VLM_BF16 ffi::Buffer<ffi::BF16>
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuAttendOneQueryBf16, AttendOneQuery,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<VLM_BF16>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<VLM_BF16>().Arg<VLM_BF16>().Arg<ffi::Buffer<ffi::PRED>>().Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuRangeAttentionBf16, RangeAttention,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<VLM_BF16>().Arg<VLM_BF16>().Arg<VLM_BF16>()
                                  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::BF16>>());
// a product of many rows: x, live (as the JAX side's `live`), the layer's index, the weights.
XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmCpuMatmulBf16, Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<VLM_BF16>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>().RemainingArgs().Ret<ffi::Buffer<ffi::F32>>());

// Whether the prefill kernels (the product of many rows, attention over key ranges) beat XLA's here: with
// AVX-512 or AVX2 (the portable build's product is ~9x slower than XLA's GEMM).
extern "C" int VlmCpuKernelsNative() {
#if defined(VLM_AVX512) || defined(VLM_AVX2)
  return 1;
#else
  return 0;
#endif
}

extern "C" int VlmCpuKernelsAmx() { return amx_ready(); }
