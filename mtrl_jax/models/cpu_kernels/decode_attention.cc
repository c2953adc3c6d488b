// Decode-step attention over a KV cache for XLA:CPU (an XLA FFI custom call).
//
// One query token per row, grouped-query heads. Per (row, kv head) the kernel reads only the
// row's valid cache slots, once, and the (row, kv head) tasks are spread over XLA's intra-op
// thread pool. The XLA formulation of the same step runs as one single-threaded loop fusion
// over the whole cache window (mtrl_jax/models/transformer.py, attend_cache).
//
//   q       [B, H, D]      f32   (H = KV * G query heads, head h uses kv head h / G)
//   k       [B, KV, D, S]  f32   keys, one row of S slots per feature
//   v       [B, KV, S, D]  f32   values, one row of D features per slot
//   n_valid [B]            s32   slots 0 .. n_valid[b]-1 are attended (clipped to [1, S])
//   out     [B, H, D]      f32
//
// Scores and softmax in f32 (scale = D^-0.5), like the XLA path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0 (inputs are scores minus their maximum): 2^n * p(r) with x = n ln2 + r,
// |r| <= ln2 / 2, p a degree-6 Taylor polynomial (relative error ~2e-7); x < -87 gives 0.
// Branch-free so that the loop vectorises.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Shape {
  int64_t b, h, kv, d, s;
};

// Attention of the G query heads of (row b, kv head g).
void AttendOne(const Shape& sh, const float* q, const float* k, const float* v,
               const int32_t* n_valid, float* out, int64_t task, std::vector<float>& scratch) {
  const int64_t b = task / sh.kv, g = task % sh.kv, groups = sh.h / sh.kv;
  const int64_t d_dim = sh.d, s_dim = sh.s;
  const int64_t n = std::clamp<int64_t>(n_valid[b], 1, s_dim);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_dim));
  const float* kp = k + (b * sh.kv + g) * d_dim * s_dim;
  const float* vp = v + (b * sh.kv + g) * s_dim * d_dim;
  const float* qp = q + (b * sh.h + g * groups) * d_dim;
  float* op = out + (b * sh.h + g * groups) * d_dim;
  scratch.assign(groups * n, 0.0f);
  // scores[j][t] = scale * sum_f q[j][f] k[f][t]: each key row is read once for all G heads
  for (int64_t f = 0; f < d_dim; ++f) {
    const float* krow = kp + f * s_dim;
    for (int64_t j = 0; j < groups; ++j) {
      const float qf = qp[j * d_dim + f] * scale;
      float* sc = scratch.data() + j * n;
      for (int64_t t = 0; t < n; ++t) sc[t] += qf * krow[t];
    }
  }
  for (int64_t j = 0; j < groups; ++j) {
    float* sc = scratch.data() + j * n;
    float mx = sc[0];
    for (int64_t t = 1; t < n; ++t) mx = std::max(mx, sc[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      sc[t] = exp_nonpos(sc[t] - mx);
      sum += sc[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < n; ++t) sc[t] *= inv;
    std::fill(op + j * d_dim, op + (j + 1) * d_dim, 0.0f);
  }
  // out[j][:] = sum_t p[j][t] v[t][:]: each value row is read once for all G heads
  for (int64_t t = 0; t < n; ++t) {
    const float* vrow = vp + t * d_dim;
    for (int64_t j = 0; j < groups; ++j) {
      const float pj = scratch[j * n + t];
      float* o = op + j * d_dim;
      for (int64_t f = 0; f < d_dim; ++f) o[f] += pj * vrow[f];
    }
  }
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> n_valid,
                               ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || n_valid.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("decode_attention: expected q [B,H,D], k [B,KV,D,S], "
                                       "v [B,KV,S,D], n_valid [B]");
  const Shape sh{qd[0], qd[1], kd[1], qd[2], kd[3]};
  if (kd[0] != sh.b || kd[2] != sh.d || vd[0] != sh.b || vd[1] != sh.kv || vd[2] != sh.s ||
      vd[3] != sh.d || n_valid.dimensions()[0] != sh.b || sh.kv <= 0 || sh.h % sh.kv != 0)
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes");
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* np = n_valid.typed_data();
  float* op = out->typed_data();
  const int64_t tasks = sh.b * sh.kv;
  // Tasks are claimed from a shared counter by this thread and by helpers on the intra-op
  // pool. A helper that starts late finds no task left and touches nothing but the counter
  // (kept alive by the shared pointer), so this call returns as soon as every task is done.
  auto progress = std::make_shared<Progress>();
  auto work = [sh, qp, kp, vp, np, op, tasks, progress]() {
    thread_local std::vector<float> scratch;
    for (int64_t i; (i = progress->next.fetch_add(1)) < tasks;) {
      AttendOne(sh, qp, kp, vp, np, op, i, scratch);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (progress->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtrlDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
