// jaxnv's float32 matmul through Intel MKL's cblas_sgemm, as an XLA FFI call on the CPU.
// Built once by jaxnv/models/mkl.py with the system C++ compiler; see docs/performance.md.
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The standard CBLAS interface, as libmkl_rt exports it (no MKL headers needed to build).
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// C = op(A) @ op(B), row-major. A (..., r, c) and B (..., r, c) share C's leading (batch) dims,
// where a dim of size 1 broadcasts (vmap's "expand_dims" calls); op transposes the last two.
static ffi::Error Sgemm(ffi::AnyBuffer a_any, ffi::AnyBuffer b_any, ffi::Result<ffi::AnyBuffer> c_any,
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
    cblas_sgemm(kRowMajor, ta, tb, static_cast<int>(batch * m), static_cast<int>(n),
                static_cast<int>(k), 1.0f, a, lda, b, ldb, 0.0f, c, static_cast<int>(n));
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
    cblas_sgemm(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                1.0f, a + oa, lda, b + ob, ldb, 0.0f, c + e * m * n, static_cast<int>(n));
  }
  return ffi::Error::Success();
}

// MKL's grouped batch of sgemms (one group here): every product of the batch in one call.
extern "C" void cblas_sgemm_batch(int layout, const int* trans_a, const int* trans_b, const int* m,
                                  const int* n, const int* k, const float* alpha, const float** a,
                                  const int* lda, const float** b, const int* ldb,
                                  const float* beta, float** c, const int* ldc, int group_count,
                                  const int* group_size);

// Attention's per-head products on (B, T, heads, H) tensors, read and written in place through
// leading dimensions (no transposes). G = query heads per kv head; for head n, kv head n / G.
//   mode 0, scores: x (B, T, N, H), y (B, S, K, H) -> c (B, N, T, S) = x_n @ y_kv^T
//   mode 1, mix:    p (B, N, T, S), y (B, S, K, H) -> c (B, T, N, H) = p_n @ y_kv
//   mode 2, mix^T:  p (B, N, T, S), x (B, T, N, H) -> c (B, S, K, H) = sum over the G heads n
//                   of kv head k of p_n^T @ x_n
static ffi::Error Heads(ffi::AnyBuffer a_any, ffi::AnyBuffer b_any,
                        ffi::Result<ffi::AnyBuffer> c_any, int32_t mode) {
  auto ad = a_any.dimensions(), bd = b_any.dimensions(), cd = c_any->dimensions();
  if (ad.size() != 4 || bd.size() != 4 || cd.size() != 4) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_heads: rank-4 operands");
  }
  const float* a = static_cast<const float*>(a_any.untyped_data());
  const float* b = static_cast<const float*>(b_any.untyped_data());
  float* c = static_cast<float*>(c_any->untyped_data());
  int64_t B = ad[0], N, T, S, K, H;
  if (mode == 0) {
    T = ad[1], N = ad[2], H = ad[3], S = bd[1], K = bd[2];
    if (bd[3] != H || cd[1] != N || cd[2] != T || cd[3] != S) {
      return ffi::Error::InvalidArgument("jaxnv_mkl_heads: scores shapes");
    }
  } else if (mode == 1) {
    N = ad[1], T = ad[2], S = ad[3], K = bd[2], H = bd[3];
    if (bd[1] != S || cd[1] != T || cd[2] != N || cd[3] != H) {
      return ffi::Error::InvalidArgument("jaxnv_mkl_heads: mix shapes");
    }
  } else if (mode == 2) {
    N = ad[1], T = ad[2], S = ad[3], H = bd[3], K = cd[2];
    if (bd[1] != T || bd[2] != N || cd[1] != S || cd[3] != H) {
      return ffi::Error::InvalidArgument("jaxnv_mkl_heads: mix^T shapes");
    }
  } else {
    return ffi::Error::InvalidArgument("jaxnv_mkl_heads: mode 0, 1 or 2");
  }
  if (B != bd[0] || B != cd[0] || K == 0 || N % K) {
    return ffi::Error::InvalidArgument("jaxnv_mkl_heads: batch or head counts do not match");
  }
  const int64_t G = N / K;
  const int64_t groups = mode == 2 ? G : 1;       // mode 2 accumulates the G heads in turn
  const int64_t count = mode == 2 ? B * K : B * N;  // products per batched call
  std::vector<const float*> as(count), bs(count);
  std::vector<float*> cs(count);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t i = 0;
    for (int64_t bi = 0; bi < B; ++bi) {
      for (int64_t h = 0; h < (mode == 2 ? K : N); ++h, ++i) {
        const int64_t n = mode == 2 ? h * G + g : h, kv = n / G;
        if (mode == 0) {
          as[i] = a + (bi * T * N + n) * H;
          bs[i] = b + (bi * S * K + kv) * H;
          cs[i] = c + (bi * N + n) * T * S;
        } else if (mode == 1) {
          as[i] = a + (bi * N + n) * T * S;
          bs[i] = b + (bi * S * K + kv) * H;
          cs[i] = c + (bi * T * N + n) * H;
        } else {
          as[i] = a + (bi * N + n) * T * S;
          bs[i] = b + (bi * T * N + n) * H;
          cs[i] = c + (bi * S * K + kv) * H;
        }
      }
    }
    int ta, tb, m, n_, k, lda, ldb, ldc;
    if (mode == 0) {  // (T, H) @ (S, H)^T
      ta = kNoTrans, tb = kTrans, m = T, n_ = S, k = H, lda = N * H, ldb = K * H, ldc = S;
    } else if (mode == 1) {  // (T, S) @ (S, H)
      ta = kNoTrans, tb = kNoTrans, m = T, n_ = H, k = S, lda = S, ldb = K * H, ldc = N * H;
    } else {  // (T, S)^T @ (T, H)
      ta = kTrans, tb = kNoTrans, m = S, n_ = H, k = T, lda = S, ldb = N * H, ldc = K * H;
    }
    const float alpha = 1.0f, beta = g == 0 ? 0.0f : 1.0f;
    const int size = static_cast<int>(count);
    cblas_sgemm_batch(kRowMajor, &ta, &tb, &m, &n_, &k, &alpha, as.data(), &lda, bs.data(), &ldb,
                      &beta, cs.data(), &ldc, 1, &size);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklHeads, Heads,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
