// jaxnv's float32 matmul through Intel MKL's cblas_sgemm, as an XLA FFI call on the CPU.
// Built once by jaxnv/models/mkl.py with the system C++ compiler; see docs/performance.md.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The standard CBLAS interface, as libmkl_rt exports it (no MKL headers needed to build).
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

extern "C" int MKL_Set_Num_Threads_Local(int nt);

// Runs body(0..n-1) on the caller and up to (threads - 1) pool workers. The caller waits only
// for tasks a running worker has claimed, so a busy pool cannot deadlock it; a worker that
// starts late finds nothing left and touches nothing but the shared counters.
template <typename F>
static void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    const int previous = MKL_Set_Num_Threads_Local(1);
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
    MKL_Set_Num_Threads_Local(previous);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// op(A) (m, k) @ op(B) (k, n) -> C (m, n), row-major, split into one block of C's rows (or
// columns, whichever is longer) per thread of XLA's intra-op pool, each a single-threaded MKL
// call. MKL's own threads would fight XLA's pool threads, which spin between ops, for the cores.
static void Gemm(ffi::ThreadPool& pool, int ta, int tb, int64_t m, int64_t n, int64_t k,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool by_rows = m >= n;
  const int64_t len = by_rows ? m : n;
  const int64_t chunk = std::max<int64_t>(16, (len / threads + 15) / 16 * 16);  // 64-byte aligned
  const int64_t tasks = (len + chunk - 1) / chunk;
  ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t lo = t * chunk, rows = std::min(chunk, len - lo);
    if (by_rows) {  // rows of op(A): A's rows, or its columns when transposed
      const float* at = ta == kTrans ? a + lo : a + lo * lda;
      cblas_sgemm(kRowMajor, ta, tb, static_cast<int>(rows), static_cast<int>(n),
                  static_cast<int>(k), 1.0f, at, lda, b, ldb, beta, c + lo * ldc, ldc);
    } else {  // columns of op(B): B's columns, or its rows when transposed
      const float* bt = tb == kTrans ? b + lo * ldb : b + lo;
      cblas_sgemm(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(rows),
                  static_cast<int>(k), 1.0f, a, lda, bt, ldb, beta, c + lo, ldc);
    }
  });
}

// C = op(A) @ op(B), row-major. A (..., r, c) and B (..., r, c) share C's leading (batch) dims,
// where a dim of size 1 broadcasts (vmap's "expand_dims" calls); op transposes the last two.
static ffi::Error Sgemm(ffi::ThreadPool pool, ffi::AnyBuffer a_any, ffi::AnyBuffer b_any, ffi::Result<ffi::AnyBuffer> c_any,
                        bool trans_a, bool trans_b) {
  auto ad = a_any.dimensions(), bd = b_any.dimensions(), cd = c_any->dimensions();
  const size_t rank = cd.size();
  if (rank < 2 || ad.size() != rank || bd.size() != rank) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_sgemm: operands of equal rank >= 2");
  }
  const int64_t m = cd[rank - 2], n = cd[rank - 1];
  const int64_t k = trans_a ? ad[rank - 2] : ad[rank - 1];
  if ((trans_a ? ad[rank - 1] : ad[rank - 2]) != m || (trans_b ? bd[rank - 1] : bd[rank - 2]) != k ||
      (trans_b ? bd[rank - 2] : bd[rank - 1]) != n) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_sgemm: operand shapes do not match");
  }
  const float* a = static_cast<const float*>(a_any.untyped_data());
  const float* b = static_cast<const float*>(b_any.untyped_data());
  float* c = static_cast<float*>(c_any->untyped_data());
  const int lda = static_cast<int>(ad[rank - 1]), ldb = static_cast<int>(bd[rank - 1]);
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  int64_t batch = 1;
  bool a_full = true, b_single = true;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if ((ad[i] != 1 && ad[i] != cd[i]) || (bd[i] != 1 && bd[i] != cd[i])) {
      return ffi::Error::InvalidArgument("jaxnv_mkl_sgemm: batch dims do not broadcast");
    }
    batch *= cd[i];
    a_full = a_full && ad[i] == cd[i];
    b_single = b_single && bd[i] == 1;
  }
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  constexpr int64_t kIntMax = 2147483647;  // MKL's LP64 interface takes int sizes
  if (batch * m > kIntMax || n > kIntMax || k > kIntMax || ad[rank - 1] > kIntMax) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_sgemm: a dimension exceeds 2**31 - 1");
  }
  if (batch == 1 || (a_full && b_single && !trans_a)) {  // one call: the rows of A stack up
    Gemm(pool, ta, tb, batch * m, n, k, a, lda, b, ldb, 0.0f, c, static_cast<int>(n));
    return ffi::Error::Success();
  }
  // one call per batch element; a broadcast dim (size 1) has stride 0
  const int64_t a_mat = ad[rank - 2] * ad[rank - 1], b_mat = bd[rank - 2] * bd[rank - 1];
  std::vector<int64_t> a_stride(rank - 2), b_stride(rank - 2);
  int64_t sa = a_mat, sb = b_mat;
  for (size_t i = rank - 2; i-- > 0;) {
    a_stride[i] = ad[i] == 1 ? 0 : sa;
    b_stride[i] = bd[i] == 1 ? 0 : sb;
    sa *= ad[i];
    sb *= bd[i];
  }
  for (int64_t e = 0; e < batch; ++e) {
    int64_t rest = e, oa = 0, ob = 0;
    for (size_t i = rank - 2; i-- > 0;) {
      const int64_t idx = rest % cd[i];
      rest /= cd[i];
      oa += idx * a_stride[i];
      ob += idx * b_stride[i];
    }
    Gemm(pool, ta, tb, m, n, k, a + oa, lda, b + ob, ldb, 0.0f, c + e * m * n,
         static_cast<int>(n));
  }
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------- fused causal attention
// Causal self-attention straight from the packed projection qkv (B, T, K, G+2, H): for kv head k,
// slots 0..G-1 are its query heads (n = k * G + g), slot G its key, slot G+1 its value. RoPE
// (rotate-half, tables cos / sin (1 or B, T, H/2)) is applied on the fly when `rope`; the
// softmax runs in place in the probabilities' rows; the backward pass writes the packed
// gradient dqkv, so no split, rotation or concatenation is left to XLA. One task per (batch,
// kv head) on XLA's intra-op thread pool, each with single-threaded MKL calls; queries are
// taken in row blocks so that the masked upper triangle is never multiplied.

extern "C" void vmsExp(int n, const float* a, float* r, long long mode);
constexpr long long kVmlMode = 0x2 | 0x100;  // VML_HA | VML_ERRMODE_IGNORE (exp(-big) -> 0)
constexpr int64_t kRowBlock = 32;
constexpr float kExpFloor = -80.0f;

struct Rope {
  const float *cos, *sin;  // (T, H/2) rows of this batch element, or null: no rotation
  int64_t half;
};

// dst (T, H) contiguous = rotate(src rows of stride lds), or a copy without RoPE.
static void Rotate(const float* src, int64_t lds, float* dst, int64_t T, int64_t H, Rope r) {
  for (int64_t t = 0; t < T; ++t) {
    const float* x = src + t * lds;
    float* y = dst + t * H;
    if (!r.cos) {
      std::memcpy(y, x, H * sizeof(float));
      continue;
    }
    const float *c = r.cos + t * r.half, *s = r.sin + t * r.half;
    for (int64_t i = 0; i < r.half; ++i) {
      const float x1 = x[i], x2 = x[i + r.half];
      y[i] = x1 * c[i] - x2 * s[i];
      y[i + r.half] = x2 * c[i] + x1 * s[i];
    }
  }
}

// dst rows of stride ldd = the gradient through Rotate of g (T, H) contiguous.
static void RotateBack(const float* g, float* dst, int64_t ldd, int64_t T, int64_t H, Rope r) {
  for (int64_t t = 0; t < T; ++t) {
    const float* x = g + t * H;
    float* y = dst + t * ldd;
    if (!r.cos) {
      std::memcpy(y, x, H * sizeof(float));
      continue;
    }
    const float *c = r.cos + t * r.half, *s = r.sin + t * r.half;
    for (int64_t i = 0; i < r.half; ++i) {
      const float g1 = x[i], g2 = x[i + r.half];
      y[i] = g1 * c[i] + g2 * s[i];
      y[i + r.half] = g2 * c[i] - g1 * s[i];
    }
  }
}

struct Packed {
  int64_t B, T, K, G, H, N, ld;  // ld: the row (time) stride of qkv, K * (G + 2) * H
  int64_t rope_rows;              // 0 (no RoPE), 1 (one table) or B
};

static ffi::Error CheckPacked(ffi::AnyBuffer qkv, ffi::AnyBuffer cos, ffi::AnyBuffer sin,
                              bool rope, Packed* p) {
  auto d = qkv.dimensions();
  if (d.size() != 5 || d[3] < 3) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_attention: qkv (B, T, K, G+2, H)");
  }
  p->B = d[0], p->T = d[1], p->K = d[2], p->G = d[3] - 2, p->H = d[4];
  p->N = p->K * p->G, p->ld = p->K * d[3] * p->H, p->rope_rows = 0;
  if (rope) {
    auto c = cos.dimensions(), s = sin.dimensions();
    if (p->H % 2 || c.size() != 3 || s.size() != 3 || (c[0] != 1 && c[0] != p->B) ||
        c[1] != p->T || c[2] != p->H / 2 || c[0] != s[0] || c[1] != s[1] || c[2] != s[2]) {
      return ffi::Error::InvalidArgument("jaxnv_mkl_attention: RoPE tables (1 or B, T, H/2)");
    }
    p->rope_rows = c[0];
  }
  constexpr int64_t kIntMax = 2147483647;  // MKL's LP64 interface takes int sizes
  if (p->T > kIntMax || p->ld > kIntMax || p->N * p->H > kIntMax) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_attention: a size exceeds 2**31 - 1");
  }
  return ffi::Error::Success();
}

static Rope RopeOf(const Packed& p, ffi::AnyBuffer cos, ffi::AnyBuffer sin, int64_t b) {
  if (!p.rope_rows) return Rope{nullptr, nullptr, 0};
  const int64_t off = (p.rope_rows == 1 ? 0 : b) * p.T * (p.H / 2);
  return Rope{static_cast<const float*>(cos.untyped_data()) + off,
              static_cast<const float*>(sin.untyped_data()) + off, p.H / 2};
}

// y (B, T, N, H) = softmax(q k^T / sqrt(H), causal) v; probs (B, N, T, T) kept for the gradient.
static ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer cos,
                           ffi::AnyBuffer sin, ffi::Result<ffi::AnyBuffer> y_out,
                           ffi::Result<ffi::AnyBuffer> probs_out, bool rope) {
  Packed p;
  if (auto e = CheckPacked(qkv, cos, sin, rope, &p); e.failure()) return e;
  const int64_t T = p.T, H = p.H, N = p.N, G = p.G;
  const float* x = static_cast<const float*>(qkv.untyped_data());
  float* y = static_cast<float*>(y_out->untyped_data());
  float* probs = static_cast<float*>(probs_out->untyped_data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const int ld = static_cast<int>(p.ld), ldy = static_cast<int>(N * H), Ti = static_cast<int>(T);
  const int Hi = static_cast<int>(H);
  ParallelFor(pool, p.B * p.K, [&](int64_t task) {
    const int64_t b = task / p.K, kv = task % p.K;
    const Rope r = RopeOf(p, cos, sin, b);
    const float* base = x + b * T * p.ld + kv * (G + 2) * H;
    std::vector<float> scratch(2 * T * H);
    float *q = scratch.data(), *k = q + T * H;
    Rotate(base + G * H, p.ld, k, T, H, r);
    const float* v = base + (G + 1) * H;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kv * G + g;
      Rotate(base + g * H, p.ld, q, T, H, r);
      float* P = probs + (b * N + n) * T * T;
      for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
        const int64_t r1 = std::min(T, r0 + kRowBlock);
        const int m = static_cast<int>(r1 - r0), kend = static_cast<int>(r1);
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, kend, Hi, scale, q + r0 * H, Hi, k, Hi, 0.0f,
                    P + r0 * T, Ti);
        // row i sees keys 0..i. Shifted by the row's max and floored at -80 (exp(-80) ~ 2e-35,
        // nothing next to the max's 1) so that no exp underflows: MKL's slow path.
        for (int64_t i = r0; i < r1; ++i) {
          float* row = P + i * T;
          float top = row[0];
#pragma omp simd reduction(max : top)
          for (int64_t j = 1; j <= i; ++j) top = row[j] > top ? row[j] : top;
          for (int64_t j = 0; j <= i; ++j) row[j] = std::max(row[j] - top, kExpFloor);
          for (int64_t j = i + 1; j < T; ++j) row[j] = kExpFloor;
        }
        vmsExp(m * Ti, P + r0 * T, P + r0 * T, kVmlMode);  // one call a block
        for (int64_t i = r0; i < r1; ++i) {
          float* row = P + i * T;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j <= i; ++j) sum += row[j];
          const float inv = 1.0f / sum;
          for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
          for (int64_t j = i + 1; j < T; ++j) row[j] = 0.0f;
        }
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, Hi, kend, 1.0f, P + r0 * T, Ti, v, ld, 0.0f,
                    y + (b * T + r0) * N * H + n * H, ldy);
      }
    }
  });
  return ffi::Error::Success();
}

// dqkv (B, T, K, G+2, H): the gradient of Attention's y through q, k, v and RoPE, from dy.
static ffi::Error AttentionGrad(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer cos,
                               ffi::AnyBuffer sin, ffi::AnyBuffer probs_in, ffi::AnyBuffer dy_in,
                               ffi::Result<ffi::AnyBuffer> dqkv_out, bool rope) {
  Packed p;
  if (auto e = CheckPacked(qkv, cos, sin, rope, &p); e.failure()) return e;
  const int64_t T = p.T, H = p.H, N = p.N, G = p.G;
  const float* x = static_cast<const float*>(qkv.untyped_data());
  const float* probs = static_cast<const float*>(probs_in.untyped_data());
  const float* dy = static_cast<const float*>(dy_in.untyped_data());
  float* dx = static_cast<float*>(dqkv_out->untyped_data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const int ld = static_cast<int>(p.ld), ldy = static_cast<int>(N * H), Ti = static_cast<int>(T);
  const int Hi = static_cast<int>(H);
  ParallelFor(pool, p.B * p.K, [&](int64_t task) {
    const int64_t b = task / p.K, kv = task % p.K;
    const Rope r = RopeOf(p, cos, sin, b);
    const float* base = x + b * T * p.ld + kv * (G + 2) * H;
    float* dbase = dx + b * T * p.ld + kv * (G + 2) * H;
    std::vector<float> scratch(5 * T * H + T * T, 0.0f);
    float *q = scratch.data(), *k = q + T * H, *dq = k + T * H, *dk = dq + T * H;
    float *dv = dk + T * H, *dS = dv + T * H;
    Rotate(base + G * H, p.ld, k, T, H, r);
    const float* v = base + (G + 1) * H;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kv * G + g;
      Rotate(base + g * H, p.ld, q, T, H, r);
      const float* P = probs + (b * N + n) * T * T;
      const float* d = dy + b * T * N * H + n * H;  // rows of stride N * H
      for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
        const int64_t r1 = std::min(T, r0 + kRowBlock);
        const int m = static_cast<int>(r1 - r0), kend = static_cast<int>(r1);
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, kend, Hi, 1.0f, d + r0 * N * H, ldy, v, ld,
                    0.0f, dS + r0 * T, Ti);  // dP = dy v^T
        for (int64_t i = r0; i < r1; ++i) {  // dS = P (dP - sum(P dP)) / sqrt(H)
          const float* pr = P + i * T;
          float* row = dS + i * T;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j <= i; ++j) dot += pr[j] * row[j];
          for (int64_t j = 0; j <= i; ++j) row[j] = pr[j] * (row[j] - dot) * scale;
          for (int64_t j = i + 1; j < kend; ++j) row[j] = 0.0f;
        }
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, Hi, kend, 1.0f, dS + r0 * T, Ti, k, Hi,
                    0.0f, dq + r0 * H, Hi);  // dq = dS k
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, kend, Hi, m, 1.0f, dS + r0 * T, Ti, q + r0 * H,
                    Hi, 1.0f, dk, Hi);  // dk += dS^T q
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, kend, Hi, m, 1.0f, P + r0 * T, Ti,
                    d + r0 * N * H, ldy, 1.0f, dv, Hi);  // dv += P^T dy
      }
      RotateBack(dq, dbase + g * H, p.ld, T, H, r);
    }
    RotateBack(dk, dbase + G * H, p.ld, T, H, r);
    RotateBack(dv, dbase + (G + 1) * H, p.ld, T, H, Rope{nullptr, nullptr, 0});
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------- the gated MLP's SiLU
// hidden (..., F) = silu(gate) * up from gate_up (..., 2, F), and its gradient written packed as
// d gate_up (..., 2, F): no split, no concatenation, one pass each way. sigmoid(x) = 1 / (1 +
// exp(-x)) with -x clamped to [-80, 80], so that MKL's exp never under- or overflows (its slow
// path); beyond that range sigmoid is 0 or 1 to float precision anyway.
constexpr int64_t kGateRows = 16;

static ffi::Error CheckGate(ffi::AnyBuffer gu, int64_t* rows, int64_t* F) {
  auto d = gu.dimensions();
  if (d.size() < 2 || d[d.size() - 2] != 2) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_silu_gate: gate_up (..., 2, F)");
  }
  *F = d[d.size() - 1];
  *rows = 1;
  for (size_t i = 0; i + 2 < d.size(); ++i) *rows *= d[i];
  return ffi::Error::Success();
}

// e[i] = exp(-clamp(x[i])) for the `n` gate values of a block of rows (stride 2F, width F).
static void NegExp(const float* gate, int64_t rows, int64_t F, float* e) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = gate + r * 2 * F;
    float* y = e + r * F;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) y[j] = std::min(std::max(-x[j], kExpFloor), -kExpFloor);
  }
  vmsExp(static_cast<int>(rows * F), e, e, kVmlMode);
}

static ffi::Error SiluGate(ffi::ThreadPool pool, ffi::AnyBuffer gu_in,
                           ffi::Result<ffi::AnyBuffer> out) {
  int64_t rows, F;
  if (auto e = CheckGate(gu_in, &rows, &F); e.failure()) return e;
  const float* gu = static_cast<const float*>(gu_in.untyped_data());
  float* h = static_cast<float*>(out->untyped_data());
  ParallelFor(pool, (rows + kGateRows - 1) / kGateRows, [&](int64_t t) {
    const int64_t r0 = t * kGateRows, n = std::min(kGateRows, rows - r0);
    std::vector<float> e(n * F);
    NegExp(gu + r0 * 2 * F, n, F, e.data());
    for (int64_t r = 0; r < n; ++r) {
      const float *gate = gu + (r0 + r) * 2 * F, *up = gate + F, *er = e.data() + r * F;
      float* y = h + (r0 + r) * F;
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) y[j] = gate[j] / (1.0f + er[j]) * up[j];
    }
  });
  return ffi::Error::Success();
}

static ffi::Error SiluGateGrad(ffi::ThreadPool pool, ffi::AnyBuffer gu_in, ffi::AnyBuffer d_in,
                               ffi::Result<ffi::AnyBuffer> dgu_out) {
  int64_t rows, F;
  if (auto e = CheckGate(gu_in, &rows, &F); e.failure()) return e;
  const float* gu = static_cast<const float*>(gu_in.untyped_data());
  const float* d = static_cast<const float*>(d_in.untyped_data());
  float* dgu = static_cast<float*>(dgu_out->untyped_data());
  ParallelFor(pool, (rows + kGateRows - 1) / kGateRows, [&](int64_t t) {
    const int64_t r0 = t * kGateRows, n = std::min(kGateRows, rows - r0);
    std::vector<float> e(n * F);
    NegExp(gu + r0 * 2 * F, n, F, e.data());
    for (int64_t r = 0; r < n; ++r) {
      const float *gate = gu + (r0 + r) * 2 * F, *up = gate + F, *er = e.data() + r * F;
      const float* dh = d + (r0 + r) * F;
      float *dgate = dgu + (r0 + r) * 2 * F, *dup = dgate + F;
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        const float sig = 1.0f / (1.0f + er[j]), x = gate[j];
        dup[j] = dh[j] * x * sig;  // d/d up of silu(gate) * up
        dgate[j] = dh[j] * up[j] * sig * (1.0f + x * (1.0f - sig));  // silu' = sig (1 + x (1 - sig))
      }
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklSiluGate, SiluGate,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklSiluGateGrad, SiluGateGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("rope"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklAttentionGrad, AttentionGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("rope"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
