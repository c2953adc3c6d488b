// Decode-step attention over a KV cache for XLA:CPU (an XLA FFI custom call).
//
// One new token per row, grouped-query heads, activations feature-major (the layout of
// CausalLM.decode_logits on CPU). For each (row, kv head) the kernel writes the row's new key
// and value into its cache slot, then attends over the row's valid slots only, reading each
// once; the (row, kv head) tasks are spread over XLA's intra-op thread pool. The XLA
// formulation of the same step (a scatter, then attend_cache in transformer.py) runs the
// attention as one single-threaded loop fusion over the whole cache window.
//
//   q         [H, D, B]      f32  queries (H = KV * G heads; head h uses kv head h / G)
//   k_new     [KV, D, B]     f32  this step's keys
//   v_new     [KV, D, B]     f32  this step's values
//   write_pos [B]            s32  the slot each row writes (S or more: the row writes nothing)
//   n_valid   [B]            s32  slots 0 .. n_valid[b]-1 are attended (clipped to [1, S])
//   k_cache   [B, KV, D, S]  f32  keys, one row of S slots per feature   (updated in place)
//   v_cache   [B, KV, S, D]  f32  values, one row of D features per slot (updated in place)
// Results: out [H, D, B] f32, and the two caches (aliased to the inputs).
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

struct Args {
  Shape sh;
  const float *q, *k_new, *v_new;
  const int32_t *write_pos, *n_valid;
  float *k, *v, *out;
};

// Row b, kv head g: write the new key/value, then attention of the G query heads of g.
void AttendOne(const Args& a, int64_t task, std::vector<float>& scratch) {
  const Shape& sh = a.sh;
  const int64_t b = task / sh.kv, g = task % sh.kv, groups = sh.h / sh.kv;
  const int64_t d_dim = sh.d, s_dim = sh.s, rows = sh.b;
  float* kp = a.k + (b * sh.kv + g) * d_dim * s_dim;
  float* vp = a.v + (b * sh.kv + g) * s_dim * d_dim;
  const int64_t pos = a.write_pos[b];
  if (pos >= 0 && pos < s_dim) {
    for (int64_t f = 0; f < d_dim; ++f) {
      kp[f * s_dim + pos] = a.k_new[(g * d_dim + f) * rows + b];
      vp[pos * d_dim + f] = a.v_new[(g * d_dim + f) * rows + b];
    }
  }
  const int64_t n = std::clamp<int64_t>(a.n_valid[b], 1, s_dim);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_dim));
  // scratch: G x n scores, then G x D outputs
  scratch.assign(groups * (n + d_dim), 0.0f);
  float* op = scratch.data() + groups * n;
  // scores[j][t] = scale * sum_f q[j][f] k[f][t]: each key row is read once for all G heads
  for (int64_t f = 0; f < d_dim; ++f) {
    const float* krow = kp + f * s_dim;
    for (int64_t j = 0; j < groups; ++j) {
      const float qf = a.q[((g * groups + j) * d_dim + f) * rows + b] * scale;
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
  for (int64_t j = 0; j < groups; ++j)
    for (int64_t f = 0; f < d_dim; ++f)
      a.out[((g * groups + j) * d_dim + f) * rows + b] = op[j * d_dim + f];
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                               ffi::Buffer<ffi::S32> write_pos, ffi::Buffer<ffi::S32> n_valid,
                               ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                               ffi::ResultBuffer<ffi::F32> v_out) {
  auto qd = q.dimensions(), kd = k_in.dimensions(), vd = v_in.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: expected q [H,D,B], k_cache "
                                       "[B,KV,D,S], v_cache [B,KV,S,D]");
  const Shape sh{qd[2], qd[0], kd[1], qd[1], kd[3]};
  auto same = [](auto dims, std::initializer_list<int64_t> want) {
    return dims.size() == want.size() && std::equal(want.begin(), want.end(), dims.begin());
  };
  if (!same(kd, {sh.b, sh.kv, sh.d, sh.s}) || !same(vd, {sh.b, sh.kv, sh.s, sh.d}) ||
      !same(k_new.dimensions(), {sh.kv, sh.d, sh.b}) ||
      !same(v_new.dimensions(), {sh.kv, sh.d, sh.b}) || !same(write_pos.dimensions(), {sh.b}) ||
      !same(n_valid.dimensions(), {sh.b}) || sh.kv <= 0 || sh.h % sh.kv != 0)
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes");
  float* kp = k_out->typed_data();
  float* vp = v_out->typed_data();
  // the caches are aliased to the results; copy only if XLA gave distinct buffers
  if (kp != k_in.typed_data()) std::memcpy(kp, k_in.typed_data(), k_in.size_bytes());
  if (vp != v_in.typed_data()) std::memcpy(vp, v_in.typed_data(), v_in.size_bytes());
  const Args args{sh, q.typed_data(), k_new.typed_data(), v_new.typed_data(),
                  write_pos.typed_data(), n_valid.typed_data(), kp, vp, out->typed_data()};
  const int64_t tasks = sh.b * sh.kv;
  // Tasks are claimed from a shared counter by this thread and by helpers on the intra-op
  // pool. A helper that starts late finds no task left and touches nothing but the counter
  // (kept alive by the shared pointer), so this call returns as soon as every task is done.
  auto progress = std::make_shared<Progress>();
  auto work = [args, tasks, progress]() {
    thread_local std::vector<float> scratch;
    for (int64_t i; (i = progress->next.fetch_add(1)) < tasks;) {
      AttendOne(args, i, scratch);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()   // write_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // n_valid
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Ret<ffi::Buffer<ffi::F32>>()); // v_cache
