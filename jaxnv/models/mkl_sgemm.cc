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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnvMklSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
