// Native CPU kernels of the fused IP ops (ipfx::ip_conv, ipfx::sparse_linear); see ipfx/ops/native.py.
//
// Convolution by linearity, tiled (order (a) of ipfx/ops/kernels.py without whole-image maps):
//
//   y[n, o, p] = sum_{(i, j) kept for o} C[o, i, j] * R[n, i, j, p],   R[n, i, j, p] = sum_t B[j, t] x[n, i, off(p, t)]
//
// where off(p, t) is the input position that tap t of the kernel reads for output position p (or none: zero
// padding). The output is cut into tiles of TP consecutive flattened positions (16, 32 or 64: the tile's
// c_in*K*TP basis responses stay in L2). Once per input size, for every tile and tap, the positions are described
// as runs (zeros, or input numbers at a fixed step: a few row segments per tap); then for one tile the kernel
//   1. for every input channel gathers its K x TP patch along the runs and multiplies it by the basis
//      (K x K), two basis rows per patch load, giving the tile's basis responses R[i*K + j][p]; rows that no
//      kept coefficient reads are skipped (and, without a basis, not even gathered);
//   2. for every output channel accumulates its CSR row, acc[p] += C * R[col][p], in registers (GCC vector
//      extensions: AVX-512 or AVX2, whatever -march=native offers), and writes the tile once, through the epilogue:
//      act(acc + bias + residual) (ipfx/ops/epilogue.py), while the tile is in registers.
// Without a basis (SP, identity) step 1 is the gather alone: a direct sparse convolution on the patch.
// Tiles go to threads (at::parallel_for); with fewer tiles than 2 per thread (small images at batch 1) the
// threads split each tile's input channels, then its output channels. Offsets also express a transposed
// convolution (off(p, t) = (p + pad - t*dil) / stride where that divides exactly), so 1-3 spatial dims,
// groups (through the block-diagonal CSR), stride, dilation, padding, output padding and transposition all
// run here. Each output element sums its CSR row in one thread, in a fixed order (a few interleaved chains of
// storage order, added pairwise: sparse_accumulate), so results do not depend on the number of threads or on
// the tiling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // streaming stores (blocked.h)
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t in[3], out[3], k[3], stride[3], pad[3], dil[3];
  bool transposed;
  int64_t K, p_in, p_out;
};

Geometry make_geometry(at::IntArrayRef in_sp, at::IntArrayRef out_sp, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed) {
  Geometry g;
  const int64_t d = in_sp.size();
  TORCH_CHECK(d >= 1 && d <= 3, "ipfx native: 1 to 3 spatial dims");
  const int64_t lead = 3 - d;  // leading unit dims
  for (int64_t a = 0; a < 3; ++a) {
    const bool real = a >= lead;
    const int64_t r = a - lead;
    g.in[a] = real ? in_sp[r] : 1;
    g.out[a] = real ? out_sp[r] : 1;
    g.k[a] = real ? kernel[r] : 1;
    g.stride[a] = real ? stride[r] : 1;
    g.pad[a] = real ? padding[r] : 0;
    g.dil[a] = real ? dilation[r] : 1;
  }
  g.transposed = transposed;
  g.K = g.k[0] * g.k[1] * g.k[2];
  g.p_in = g.in[0] * g.in[1] * g.in[2];
  g.p_out = g.out[0] * g.out[1] * g.out[2];
  return g;
}

// Input coordinate read by output coordinate o through kernel index kk along one dim, or -1.
inline int64_t source(const Geometry& g, int a, int64_t o, int64_t kk) {
  if (!g.transposed) {
    const int64_t c = o * g.stride[a] - g.pad[a] + kk * g.dil[a];
    return (c >= 0 && c < g.in[a]) ? c : -1;
  }
  const int64_t num = o + g.pad[a] - kk * g.dil[a];
  if (num < 0 || num % g.stride[a]) return -1;
  const int64_t c = num / g.stride[a];
  return c < g.in[a] ? c : -1;
}

// off[t * TP + p]: flat input offset read by tap t for tile position p0 + p, -1 for padding or past the end.
template <int TP>
void offsets(const Geometry& g, int64_t p0, int32_t* off) {
  int64_t coord[TP][3];
  bool live[TP];
  for (int p = 0; p < TP; ++p) {
    int64_t q = p0 + p;
    live[p] = q < g.p_out;
    coord[p][2] = q % g.out[2];
    q /= g.out[2];
    coord[p][1] = q % g.out[1];
    coord[p][0] = q / g.out[1];
  }
  int64_t t = 0;
  for (int64_t k0 = 0; k0 < g.k[0]; ++k0)
    for (int64_t k1 = 0; k1 < g.k[1]; ++k1)
      for (int64_t k2 = 0; k2 < g.k[2]; ++k2, ++t)
        for (int p = 0; p < TP; ++p) {
          int64_t c0 = live[p] ? source(g, 0, coord[p][0], k0) : -1;
          int64_t c1 = c0 >= 0 ? source(g, 1, coord[p][1], k1) : -1;
          int64_t c2 = c1 >= 0 ? source(g, 2, coord[p][2], k2) : -1;
          off[t * TP + p] = c2 >= 0 ? static_cast<int32_t>((c0 * g.in[1] + c1) * g.in[2] + c2) : -1;
        }
}

// TP numbers as NV = TP / L vectors of the machine's width (kVectorBytes: 64 bytes, L = 16 floats or 8 doubles,
// with AVX-512; 32 bytes, L = 8 or 4, with AVX2). GCC's vector extension keeps the accumulators in registers;
// the loops over vectors are unrolled so every index is constant. A vector wider than the machine's (64 bytes
// on AVX2, as before) was split by GCC through the stack: the 1x1 contraction's accumulators were spilled and
// reloaded around every multiply-add (perf: 112->672 1x1 @14 at 1.8 GMAC/s). Loads and stores are
// unaligned-safe (aligned(4)).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
template <typename scalar_t>
struct Lane;
template <>
struct Lane<float> {
  static constexpr int L = kVectorBytes / sizeof(float);
  typedef float V __attribute__((vector_size(kVectorBytes), aligned(4), may_alias));
};
template <>
struct Lane<double> {
  static constexpr int L = kVectorBytes / sizeof(double);
  typedef double V __attribute__((vector_size(kVectorBytes), aligned(8), may_alias));
};

// n numbers starting on a 64-byte boundary: a tile row of 64 bytes (16 floats, 8 doubles) is then one cache
// line, not two (the C library aligns to 16 bytes only). Zero-filled, or left as they come (Scratch) for
// buffers every number of which is written before it is read: the gather's patch and basis responses (each
// tile's runs cover all its TP positions, zeros past the map), where zeroing c_in*K*TP numbers per call (256
// KiB for 1024 channels) was 7% of a 1x1 layer's time on 7x7 and 14x14 maps.
struct Scratch {};
template <typename scalar_t>
class Aligned {
 public:
  explicit Aligned(size_t n) : Aligned(n, Scratch{}) { std::fill(data_, data_ + n, scalar_t(0)); }
  Aligned(size_t n, Scratch) : store_(new scalar_t[n + 64 / sizeof(scalar_t)]) {
    const auto at = reinterpret_cast<uintptr_t>(store_.get());
    data_ = reinterpret_cast<scalar_t*>((at + 63) & ~uintptr_t(63));
  }
  scalar_t* data() { return data_; }

 private:
  std::unique_ptr<scalar_t[]> store_;
  scalar_t* data_;
};

// Memory the kernels' outputs and scratch are recycled from. A freshly allocated block is new pages for the C
// library (blocks past its mmap threshold, 32 MiB at most, always; smaller ones when it has returned the top of
// its heap): the first write to every 4 KiB page faults into the kernel, which zeroes it. Measured on resnet50
// (2 threads, the frozen .pt2): 184k faults and 0.39 s of system time per forward at batch 32 (95% pruned),
// 1.5-2k faults, 5 ms at batch 1; with the C library told to keep its memory (GLIBC_TUNABLES mmap and trim
// thresholds), 1.10 -> 0.84-0.91 s and 25 -> 19 ms. So every block of at least kRecycledBytes is kept here
// after use and handed out again for a request of the same size once nothing but this list refers to it
// (the storage's reference count is 1: no tensor, view or Python object holds it), like a GPU caching
// allocator. Nor while anything holds a weak reference to it, nor once its memory is no longer the block
// allocated here (share_memory_ moved it into a shared segment another process may be reading; resize_
// reallocated it): such a block stays out of use until it is dropped from the list. (From Python each of these
// goes through a storage object, which torch keeps with the storage as one more reference once made: the
// block then stays out of use in any case; the checks hold for C++ callers as well.) At most limit() bytes
// are kept (least recently handed out dropped first; a block dropped while in use is freed by its last user);
// release() drops every block.
class Recycler {
 public:
  static constexpr int64_t kRecycledBytes = 64 * 1024;  // smaller blocks come from the C library's heap

  static Recycler& instance() {
    static Recycler* r = new Recycler();  // never destroyed: no frees after torch's allocator at exit
    return *r;
  }

  // at::empty(shape, options) for a CPU tensor, from a kept block where one of the same size is free
  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    const int64_t nbytes = c10::multiply_integers(shape) * static_cast<int64_t>(options.dtype().itemsize());
    if (nbytes < kRecycledBytes) return at::empty(shape, options);
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* best = nullptr;  // of the free blocks of this size, the one handed out last (likeliest in cache)
    for (Entry& e : kept_)
      if (static_cast<int64_t>(e.nbytes) == nbytes && (best == nullptr || e.stamp > best->stamp) && free(e)) best = &e;
    if (best != nullptr) {
      best->stamp = ++clock_;
      at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(best->storage),
                                                               c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                               options.dtype());
      t.unsafeGetTensorImpl()->set_sizes_contiguous(shape);
      return t;
    }
    at::Tensor t = at::empty(shape, options);
    if (nbytes > limit_) return t;
    evict_to(limit_ - nbytes);
    kept_.push_back({t.storage(), t.storage().data(), t.storage().nbytes(), ++clock_});
    return t;
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }
  // the most bytes kept; 0 keeps nothing (every request a fresh block); drops blocks past the new limit
  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "ipfx native: the recycled memory's limit must be >= 0 bytes, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    evict_to(limit_);
  }
  // the bytes kept (free or in use)
  int64_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return total();
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    kept_.clear();
  }

 private:
  struct Entry {
    c10::Storage storage;
    const void* data;  // the block as allocated here
    size_t nbytes;
    uint64_t stamp;
  };
  // nothing but the list refers to e's storage (strongly or weakly: the weak count is the strong references'
  // one plus the probe's), and it still owns the block allocated for it
  static bool free(const Entry& e) {
    return e.storage.use_count() == 1 && e.storage.getWeakStorageImpl().weak_use_count() == 2 &&
           e.storage.data() == e.data && e.storage.nbytes() == e.nbytes;
  }
  // (the callers hold mutex_)
  int64_t total() const {
    int64_t bytes = 0;
    for (const Entry& e : kept_) bytes += static_cast<int64_t>(e.storage.nbytes());
    return bytes;
  }
  // drop the least recently handed out blocks until at most `budget` bytes are kept
  void evict_to(int64_t budget) {
    for (int64_t bytes = total(); bytes > budget && !kept_.empty();) {
      auto oldest = std::min_element(kept_.begin(), kept_.end(),
                                     [](const Entry& a, const Entry& b) { return a.stamp < b.stamp; });
      bytes -= static_cast<int64_t>(oldest->storage.nbytes());
      kept_.erase(oldest);
    }
  }
  std::mutex mutex_;
  std::vector<Entry> kept_;
  int64_t limit_ = int64_t(1) << 30;
  uint64_t clock_ = 0;
};

// Independent accumulator chains. One chain of dependent multiply-adds (acc += w * r, a kept coefficient
// after another) waits the FMA's latency (4 cycles) per coefficient: with a 16-position tile (one 512-bit
// vector) the contraction ran at a quarter of one FMA port (perf: 94% of the loop's samples on the add's
// wait). So entry e of a CSR row goes to chain (e - e_begin) mod CH, CH chosen to keep about 8 machine
// vectors in flight, and the chains are added pairwise at the end: a fixed order per row, the same for
// every thread count and tiling (it depends on the CPU's vector width, which -march=native fixes).
template <int NV>
constexpr int chains() {
  return 8 / NV > 1 ? 8 / NV : 1;
}

// out[0 .. NV) = sum_{e in [e0, e1)} vals[e] * row(e)[0 .. NV), row(e) a const V* (CH chains, above; a caller
// whose tile width varies fixes CH, so that every position's sum is the same whatever the width); with `step`,
// the NV vectors row(e)[0], row(e)[step], ... (the blocked layout's strided positions, blocked.h).
template <typename scalar_t, int NV, int CH = chains<NV>(), typename RowOf>
inline void sparse_accumulate(const scalar_t* __restrict__ vals, int64_t e0, int64_t e1, RowOf row_of,
                              typename Lane<scalar_t>::V* out, int64_t step = 1) {
  using V = typename Lane<scalar_t>::V;
  V acc[CH][NV];
#pragma GCC unroll 8
  for (int c = 0; c < CH; ++c)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[c][v] = V{};
  int64_t e = e0;
  for (; e + CH <= e1; e += CH) {
#pragma GCC unroll 8
    for (int c = 0; c < CH; ++c) {
      const scalar_t w = vals[e + c];
      const V* r = row_of(e + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[c][v] += w * r[v * step];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < CH; ++c) {  // the last e1 - e < CH entries, chain by chain
    if (e + c < e1) {
      const scalar_t w = vals[e + c];
      const V* r = row_of(e + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[c][v] += w * r[v * step];
    }
  }
#pragma GCC unroll 8
  for (int s = 1; s < CH; s *= 2)
#pragma GCC unroll 8
    for (int c = 0; c + s < CH; c += 2 * s)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[c][v] += acc[c + s][v];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) out[v] = acc[0][v];
}

// A tile's tap -> input map as runs: for tap t, runs[first[t]] .. runs[first[t + 1]] cover its TP positions in
// order; a run copies len consecutive input numbers from src (or writes zeros where src < 0). With stride 1
// a tap's TP positions are a few row segments, so the gather is a few memcpy calls.
struct Run {
  int32_t len, src, step;
};

void runs_of(const int32_t* off, int64_t K, int TP, std::vector<Run>& runs, std::vector<int32_t>& first) {
  runs.clear();
  first.assign(K + 1, 0);
  for (int64_t t = 0; t < K; ++t) {
    first[t] = static_cast<int32_t>(runs.size());
    const int32_t* o = off + t * TP;
    for (int p = 0; p < TP;) {
      int q = p + 1;
      if (o[p] < 0) {
        while (q < TP && o[q] < 0) ++q;
        runs.push_back({q - p, -1, 0});
      } else {
        const int32_t step = (q < TP && o[q] > o[p]) ? o[q] - o[p] : 1;  // stride s: src, src + s, ...
        while (q < TP && o[q] == o[q - 1] + step) ++q;
        runs.push_back({q - p, o[p], step});
      }
      p = q;
    }
  }
  first[K] = static_cast<int32_t>(runs.size());
}

// Append a run, merged into the previous one of the same tap where it continues it.
inline void push_run(std::vector<Run>& runs, size_t tap_begin, int32_t len, int32_t src, int32_t step) {
  if (len <= 0) return;
  if (runs.size() > tap_begin) {
    Run& last = runs.back();
    if (src < 0 && last.src < 0) {
      last.len += len;
      return;
    }
    if (src >= 0 && last.src >= 0) {
      const int32_t st = last.len == 1 ? (len == 1 ? src - last.src : step) : last.step;
      if (st > 0 && (last.len == 1 || last.step == st) && (len == 1 || step == st) &&
          last.src + last.len * st == src) {
        last.step = st;
        last.len += len;
        return;
      }
    }
  }
  runs.push_back({len, src, src < 0 ? 0 : step});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The runs of every tile of TP positions: tile u's tap t covers runs[first[u*K + t] .. first[u*K + t + 1]).
// They depend on the geometry only, so they are built once per call (shared by every sample of the batch), or
// once per input size where a bound conv keeps them (TileRunsCache).
// An ordinary conv gets them in closed form, per output row segment: zeros, one strided run, zeros; a
// transposed conv goes through the per-position offset table.
template <int TP>
void tile_runs(const Geometry& g, int64_t ntiles, std::vector<Run>& runs, std::vector<int32_t>& first) {
  const int64_t K = g.K;
  runs.clear();
  first.assign(ntiles * K + 1, 0);
  std::vector<int32_t> off, tile_first;
  std::vector<Run> tile;
  if (g.transposed) off.resize(K * TP);
  for (int64_t u = 0; u < ntiles; ++u) {
    const int64_t p0 = u * TP;
    if (g.transposed) {
      offsets<TP>(g, p0, off.data());
      runs_of(off.data(), K, TP, tile, tile_first);
      for (int64_t t = 0; t < K; ++t) {
        first[u * K + t] = static_cast<int32_t>(runs.size());
        const size_t begin = runs.size();
        for (int32_t r = tile_first[t]; r < tile_first[t + 1]; ++r)
          push_run(runs, begin, tile[r].len, tile[r].src, tile[r].step);
      }
      continue;
    }
    int64_t t = 0;
    for (int64_t k0 = 0; k0 < g.k[0]; ++k0)
      for (int64_t k1 = 0; k1 < g.k[1]; ++k1)
        for (int64_t k2 = 0; k2 < g.k[2]; ++k2, ++t) {
          first[u * K + t] = static_cast<int32_t>(runs.size());
          const size_t begin = runs.size();
          // valid innermost output coordinates for this tap: o2 * s - pad + k2 * dil in [0, in2)
          const int64_t shift = k2 * g.dil[2] - g.pad[2];
          const int64_t lo = std::max<int64_t>(0, ceil_div(-shift, g.stride[2]));
          const int64_t hi = floor_div(g.in[2] - 1 - shift, g.stride[2]);  // inclusive; may be < lo
          int64_t q = p0;
          const int64_t end = p0 + TP;
          while (q < end) {
            if (q >= g.p_out) {
              push_run(runs, begin, static_cast<int32_t>(end - q), -1, 0);
              break;
            }
            const int64_t o2 = q % g.out[2], o01 = q / g.out[2];
            const int64_t o1 = o01 % g.out[1], o0 = o01 / g.out[1];
            const int64_t len = std::min(g.out[2] - o2, end - q);
            const int64_t c0 = source(g, 0, o0, k0), c1 = c0 >= 0 ? source(g, 1, o1, k1) : -1;
            if (c1 < 0) {
              push_run(runs, begin, static_cast<int32_t>(len), -1, 0);
            } else {
              const int64_t a = std::min(std::max(lo, o2), o2 + len), b = std::max(a, std::min(hi + 1, o2 + len));
              const int64_t base = (c0 * g.in[1] + c1) * g.in[2];
              push_run(runs, begin, static_cast<int32_t>(a - o2), -1, 0);
              push_run(runs, begin, static_cast<int32_t>(b - a), static_cast<int32_t>(base + a * g.stride[2] + shift),
                       static_cast<int32_t>(g.stride[2]));
              push_run(runs, begin, static_cast<int32_t>(o2 + len - b), -1, 0);
            }
            q += len;
          }
        }
  }
  first[ntiles * K] = static_cast<int32_t>(runs.size());
}

// A bound conv's tile runs, kept for the input size they were built for: tile_runs is serial and, per call,
// took 46% of the main thread's time in a 16-channel depthwise 3x3 on 112x112 (batch 1, 2 threads) and 30% in
// mobilenet_v3_large's stem. `get` returns the kept runs where `g` has the input size and TP they were made for,
// else builds them (outside the lock: two calls may both build; either result is the same) and keeps those.
struct TileRunsCache {
  struct Entry {
    int64_t in[3], tp;
    std::vector<Run> runs;
    std::vector<int32_t> first;
  };
  template <int TP>
  std::shared_ptr<const Entry> get(const Geometry& g, int64_t ntiles) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (kept && kept->tp == TP && std::equal(g.in, g.in + 3, kept->in)) return kept;
    }
    auto entry = std::make_shared<Entry>();
    std::copy(g.in, g.in + 3, entry->in);
    entry->tp = TP;
    tile_runs<TP>(g, ntiles, entry->runs, entry->first);
    std::lock_guard<std::mutex> lock(mutex);
    kept = entry;
    return entry;
  }
  std::mutex mutex;
  std::shared_ptr<const Entry> kept;
};

// r[0 .. TP) = the tap's input numbers (zeros for padding). Small images make many short runs, so runs are
// copied a whole vector at a time where that stays inside the row (r[0 .. TP)) and, for reads,
// inside the channel's p_in numbers: up to L - 1 numbers past a run are written and then taken over by the
// next run. Elsewhere (a row's last run, strided runs) one number at a time.
template <typename scalar_t, int TP>
inline void gather(const scalar_t* __restrict__ xi, const Run* run, const Run* end, scalar_t* __restrict__ r,
                   int64_t p_in) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L;
  scalar_t* const row_end = r + TP;
  for (; run != end; ++run) {
    const int32_t len = run->len, whole = (len + L - 1) / L * L;
    const bool fits = r + whole <= row_end;
    if (run->src < 0) {
      if (fits) {
        for (int32_t q = 0; q < len; q += L) *reinterpret_cast<V*>(r + q) = V{};
      } else {
        for (int32_t q = 0; q < len; ++q) r[q] = scalar_t(0);
      }
    } else if (run->step == 1 && fits && run->src + whole <= p_in) {
      const scalar_t* src = xi + run->src;
      for (int32_t q = 0; q < len; q += L) *reinterpret_cast<V*>(r + q) = *reinterpret_cast<const V*>(src + q);
    } else if (run->step == 2) {  // (stride 2: a constant step vectorises; a variable one ran number by number)
      const scalar_t* src = xi + run->src;
      for (int32_t q = 0; q < len; ++q) r[q] = src[2 * q];
    } else {
      const scalar_t* src = xi + run->src;
      const int32_t step = run->step;
      for (int32_t q = 0; q < len; ++q) r[q] = src[q * step];
    }
    r += len;
  }
}

// R rows of input channel i for one tile: R[j][p] = sum_t B[j][t] patch[t][p] (or the patch itself without a
// basis) for the nj rows js[0 .. nj) that some kept coefficient reads; other rows are left unwritten.
template <typename scalar_t, int TP>
void basis_responses(const scalar_t* __restrict__ xi, const Run* runs, const int32_t* first,
                     const scalar_t* __restrict__ basis, const int32_t* __restrict__ js, int32_t nj, int64_t K,
                     int64_t p_in, scalar_t* __restrict__ patch, scalar_t* __restrict__ R) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L, NV = TP / L;
  if (nj == 0) return;
  if (basis == nullptr) {
    for (int32_t q = 0; q < nj; ++q) gather<scalar_t, TP>(xi, runs + first[js[q]], runs + first[js[q] + 1], R + js[q] * TP, p_in);
    return;
  }
  for (int64_t t = 0; t < K; ++t) gather<scalar_t, TP>(xi, runs + first[t], runs + first[t + 1], patch + t * TP, p_in);
  // JB basis rows at a time: every patch vector loaded feeds JB accumulators (JB * NV <= 8 vectors)
  constexpr int JB = 8 / NV > 1 ? 8 / NV : 1;
  int32_t b = 0;
  for (; b + JB <= nj; b += JB) {
    V acc[JB][NV];
#pragma GCC unroll 8
    for (int q = 0; q < JB; ++q)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][v] = V{};
    for (int64_t t = 0; t < K; ++t) {
      const V* pt = reinterpret_cast<const V*>(patch + t * TP);
#pragma GCC unroll 8
      for (int q = 0; q < JB; ++q) {
        const scalar_t w = basis[js[b + q] * K + t];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[q][v] += w * pt[v];
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < JB; ++q) {
      V* r = reinterpret_cast<V*>(R + js[b + q] * TP);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) r[v] = acc[q][v];
    }
  }
  for (; b < nj; ++b) {
    V acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = V{};
    const scalar_t* w = basis + js[b] * K;
    for (int64_t t = 0; t < K; ++t) {
      const V* pt = reinterpret_cast<const V*>(patch + t * TP);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] += w[t] * pt[v];
    }
    V* r = reinterpret_cast<V*>(R + js[b] * TP);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) r[v] = acc[v];
  }
}

// The epilogue's activations, numbered as ipfx/ops/epilogue.py's ACTIVATIONS.
template <typename scalar_t, int A>
inline scalar_t activate(scalar_t v) {
  if constexpr (A == 1) return v < scalar_t(0) ? scalar_t(0) : v;  // (torch's: NaN and -0 stay)
  if constexpr (A == 2) return std::min(std::max(v, scalar_t(0)), scalar_t(6));
  if constexpr (A == 3) return v / (scalar_t(1) + std::exp(-v));
  if constexpr (A == 4) return scalar_t(0.5) * v * (scalar_t(1) + std::erf(v * scalar_t(0.70710678118654752440)));
  if constexpr (A == 5) return v * std::min(std::max(v + scalar_t(3), scalar_t(0)), scalar_t(6)) / scalar_t(6);
  return v;
}

// f(std::integral_constant<int, A>{}) for the activation numbered A (0 to 5; another number: nothing), so
// that a loop f runs has its activation a constant and relu, relu6 and hardswish vectorise (a switch inside
// the loop kept hardswish scalar: 3-4 ns a number).
template <typename F>
inline void with_activation(int64_t activation, F&& f) {
  switch (activation) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: break;
  }
}

// y[p] = act(y[p]) for p < n.
template <typename scalar_t>
inline void activate_run(scalar_t* __restrict__ y, int64_t n, int64_t activation) {
  if (activation == 0) return;
  with_activation(activation, [&](auto a) {
    for (int64_t p = 0; p < n; ++p) y[p] = activate<scalar_t, decltype(a)::value>(y[p]);
  });
}

// activate<A> on a vector, with the same comparisons (so the same numbers, NaN included)
template <typename scalar_t, int A>
inline typename Lane<scalar_t>::V activate_vector(typename Lane<scalar_t>::V v) {
  using V = typename Lane<scalar_t>::V;
  const V zero = V{} + scalar_t(0), six = V{} + scalar_t(6);
  if constexpr (A == 1) return v < zero ? zero : v;
  if constexpr (A == 2) {  // std::min(std::max(v, 0), 6)
    const V m = v < zero ? zero : v;
    return six < m ? six : m;
  }
  if constexpr (A == 5) {
    const V s = v + scalar_t(3), m = s < zero ? zero : s;
    return v * (six < m ? six : m) / scalar_t(6);
  }
  return v;
}

template <typename scalar_t, int NV, int A>
inline void store_vectors(const typename Lane<scalar_t>::V* acc, scalar_t b, const scalar_t* res, scalar_t* y) {
  using V = typename Lane<scalar_t>::V;
  const V* r = reinterpret_cast<const V*>(res);
  V* out = reinterpret_cast<V*>(y);
  if (res != nullptr) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) out[v] = activate_vector<scalar_t, A>((acc[v] + b) + r[v]);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) out[v] = activate_vector<scalar_t, A>(acc[v] + b);
  }
}

// y[0 .. NV*L) = act((acc + b) + res) straight from the accumulators, for a tile whose positions are one whole
// run of y (res: the residual there, or null): one store per vector instead of a pass through a buffer and
// another for the activation. The epilogue's order of additions (as the runs' loops); false, with nothing
// written, for silu and gelu (left to epilogue_span's scalar loops).
template <typename scalar_t, int NV>
inline bool store_tile(const typename Lane<scalar_t>::V* acc, scalar_t b, const scalar_t* res, int64_t activation,
                       scalar_t* y) {
  switch (activation) {
    case 0: store_vectors<scalar_t, NV, 0>(acc, b, res, y); return true;
    case 1: store_vectors<scalar_t, NV, 1>(acc, b, res, y); return true;
    case 2: store_vectors<scalar_t, NV, 2>(acc, b, res, y); return true;
    case 5: store_vectors<scalar_t, NV, 5>(acc, b, res, y); return true;
    default: return false;
  }
}

// y[0 .. n) = act((t + b) + res) (res null: act(t + b)), in one pass with the activation a constant (so that it
// vectorises): the epilogue of every span of an output that is not one whole tile in registers (store_tile).
template <typename scalar_t, int A>
inline void epilogue_span(const scalar_t* __restrict__ t, scalar_t b, const scalar_t* __restrict__ res,
                          scalar_t* __restrict__ y, int64_t n) {
  if (res != nullptr) {
    for (int64_t p = 0; p < n; ++p) y[p] = activate<scalar_t, A>((t[p] + b) + res[p]);
  } else {
    for (int64_t p = 0; p < n; ++p) y[p] = activate<scalar_t, A>(t[p] + b);
  }
}

template <typename scalar_t>
inline void epilogue_span(const scalar_t* t, scalar_t b, const scalar_t* res, scalar_t* y, int64_t n,
                          int64_t activation) {
  with_activation(activation, [&](auto a) { epilogue_span<scalar_t, decltype(a)::value>(t, b, res, y, n); });
}

// y[o][p0 + p] = act(bias[o] + sum_e vals[e] * R[col[e]][p] + res[o][p0 + p]) for one output channel's CSR
// row (res: the residual at y's position, or null; activation 0: none).
template <typename scalar_t, int TP>
inline void contract_row(const int64_t* __restrict__ crow, const int64_t* __restrict__ col,
                         const scalar_t* __restrict__ vals, const scalar_t* __restrict__ R, int64_t o, scalar_t bias,
                         scalar_t* __restrict__ yo, int64_t valid, const scalar_t* __restrict__ res,
                         int64_t activation) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L, NV = TP / L;
  V acc[NV];
  sparse_accumulate<scalar_t, NV>(vals, crow[o], crow[o + 1],
                                  [&](int64_t e) { return reinterpret_cast<const V*>(R + col[e] * TP); }, acc);
  if (valid == TP && store_tile<scalar_t, NV>(acc, bias, res, activation, yo)) return;
  alignas(64) scalar_t tmp[TP];
  std::memcpy(tmp, acc, sizeof(tmp));
  epilogue_span<scalar_t>(tmp, bias, res, yo, valid, activation);
}

template <typename scalar_t, int TP>
void conv_tiled(const at::Tensor& x, const at::Tensor& crow_t, const at::Tensor& col_t, const at::Tensor& vals_t,
                const c10::optional<at::Tensor>& basis_t, const c10::optional<at::Tensor>& bias_t,
                const at::Tensor& used_t, const c10::optional<at::Tensor>& res_t, int64_t activation,
                const Geometry& g, TileRunsCache* cache, at::Tensor& y) {
  const int64_t N = x.size(0), c_in = x.size(1), c_out = y.size(1), K = g.K;
  const int64_t ntiles = (g.p_out + TP - 1) / TP;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t* crow = crow_t.data_ptr<int64_t>();
  const int64_t* col = col_t.data_ptr<int64_t>();
  const scalar_t* vals = vals_t.data_ptr<scalar_t>();
  const scalar_t* basis = basis_t.has_value() ? basis_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* bias = bias_t.has_value() ? bias_t->data_ptr<scalar_t>() : nullptr;
  const uint8_t* used = used_t.data_ptr<uint8_t>();
  const scalar_t* rp = res_t.has_value() ? res_t->data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t units = N * ntiles;
  const int64_t threads = at::get_num_threads();
  constexpr int64_t kPad = 64 / sizeof(scalar_t);  // slack past the buffers' last row
  // per input channel, the basis-response rows some kept coefficient reads (nj[i] of them, listed in js)
  std::vector<int32_t> js(c_in * K), nj(c_in, 0);
  for (int64_t i = 0; i < c_in; ++i)
    for (int64_t j = 0; j < K; ++j)
      if (used[i * K + j]) js[i * K + nj[i]++] = static_cast<int32_t>(j);

  auto tile_geometry = [&](int64_t unit, int64_t& n, int64_t& p0, int64_t& valid) {
    n = unit / ntiles;
    p0 = (unit % ntiles) * TP;
    valid = std::min<int64_t>(TP, g.p_out - p0);
  };

  std::shared_ptr<const TileRunsCache::Entry> kept;  // the caller's (a bound conv's), else built for this call
  std::vector<Run> own_runs;
  std::vector<int32_t> own_first;
  if (cache != nullptr) {
    kept = cache->get<TP>(g, ntiles);
  } else {
    tile_runs<TP>(g, ntiles, own_runs, own_first);
  }
  const std::vector<Run>& runs = kept ? kept->runs : own_runs;
  const std::vector<int32_t>& first = kept ? kept->first : own_first;

  if (units >= 2 * threads) {  // enough tiles: each thread takes whole tiles
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      Aligned<scalar_t> patch(K * TP + kPad, Scratch{}), R(c_in * K * TP + kPad, Scratch{});
      for (int64_t unit = begin; unit < end; ++unit) {
        int64_t n, p0, valid;
        tile_geometry(unit, n, p0, valid);
        const int32_t* tf = first.data() + (unit % ntiles) * K;
        for (int64_t i = 0; i < c_in; ++i)
          basis_responses<scalar_t, TP>(xp + (n * c_in + i) * g.p_in, runs.data(), tf, basis,
                                        js.data() + i * K, nj[i], K, g.p_in, patch.data(), R.data() + i * K * TP);
        for (int64_t o = 0; o < c_out; ++o)
          contract_row<scalar_t, TP>(crow, col, vals, R.data(), o, bias ? bias[o] : scalar_t(0),
                                     yp + (n * c_out + o) * g.p_out + p0, valid,
                                     rp ? rp + (n * c_out + o) * g.p_out + p0 : nullptr, activation);
      }
    });
    return;
  }
  // few tiles (small images, batch 1): tile by tile, threads over input channels, then over output channels
  Aligned<scalar_t> R(c_in * K * TP + kPad, Scratch{});
  for (int64_t unit = 0; unit < units; ++unit) {
    int64_t n, p0, valid;
    tile_geometry(unit, n, p0, valid);
    const int32_t* tf = first.data() + (unit % ntiles) * K;
    at::parallel_for(0, c_in, 1, [&](int64_t begin, int64_t end) {
      Aligned<scalar_t> patch(K * TP + kPad, Scratch{});
      for (int64_t i = begin; i < end; ++i)
        basis_responses<scalar_t, TP>(xp + (n * c_in + i) * g.p_in, runs.data(), tf, basis,
                                      js.data() + i * K, nj[i], K, g.p_in, patch.data(), R.data() + i * K * TP);
    });
    at::parallel_for(0, c_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o)
        contract_row<scalar_t, TP>(crow, col, vals, R.data(), o, bias ? bias[o] : scalar_t(0),
                                   yp + (n * c_out + o) * g.p_out + p0, valid,
                                   rp ? rp + (n * c_out + o) * g.p_out + p0 : nullptr, activation);
    });
  }
}


// Direct sparse convolution (SP: no basis; not transposed), vectorised over output positions.
//
// The input is read in place, without a gather. Stride 1: with the input zero-padded (xp, dims ip[a] =
// in[a] + 2 pad[a]; x itself where there is no padding), output position (o0, o1, o2) of a "wide" grid laid
// over the padded input, q = (o0 ip1 + o1) ip2 + o2, reads tap (k0, k1, k2) at xp[q + (k0 d0 ip1 + k1 d1) ip2
// + k2 d2]. Stride s: the padded input is split into its s0 s1 s2 phases (padded coordinate c = o s + k d is
// position o + (k d) div s of phase (k d) mod s), each a plane of pp = ceil(ip / s), and the grid runs over
// a phase plane: tap t reads phase(t)'s plane at q + offset(t). Either way the offset is the tap's alone,
// so a tile of TP consecutive q is one unaligned vector load per kept coefficient:
//   acc[p] += C[o, i, t] * xp_i[q0 + p + off(t)],
// nnz * TP multiply-adds per tile, nothing else. Grid positions outside the output (o1 >= out1 or
// o2 >= out2, the padding columns) are computed and dropped at the write; the padded buffer has slack past
// its end for the last tile's reads.
//
// Ungrouped (conv_direct): the padded, phase-split copy of the input is made once per call, a chunk of samples
// at a time (kCopyChunkBytes; without padding and stride x is read in place, and the one tile that could read
// past its end, the last sample's last, checks its loads); threads split (sample, tile, block of output
// channels): no state is shared between output channels, so small maps (7x7, 14x14 at batch 1) still feed
// every thread.
// Grouped (conv_direct_grouped; depthwise above all): output channel o reads only its group's c_in/groups
// input channels, so a thread takes a (sample, group) at a time, lays that group's channels out padded in a
// buffer of its own (in L1/L2 for a depthwise channel) and runs the group's output channels over every tile
// from there: the input is read once, no whole-input copy, no pass between copy and use. A group without
// kept coefficients writes act(bias + residual) without reading its input, and an output channel without
// them is written in one pass (fill_channel) instead of tile by tile.
template <typename scalar_t, int TP>
struct DirectPlan {
  struct OutRun {
    int32_t p, dst, len;
  };
  int64_t ip[3], pp[3], phase_plane, plane, Q, ntiles;
  int64_t stride_c;  // per-channel stride of a padded copy: the phase planes, with slack for the last tile
  bool copied;       // padding or stride: x cannot be read in place
  std::vector<int64_t> off;  // tap t's offset from a grid position
  // where each tile's grid positions land in y: runs (tile position, y position, length) of output row
  // segments, tile u's in out_runs[run_first[u] .. run_first[u + 1]); segments that continue each other in
  // the tile and in y are one run (a grid as wide as y's rows: 1x1 and unpadded convs with one kernel column),
  // so such a tile is one run, written straight from the accumulators (store_tile; a 1x1 conv @56 spent 14%
  // of its time in the run-by-run path when every row break made a run)
  std::vector<OutRun> out_runs;
  std::vector<int32_t> run_first;
  // copy_channel's tables: input row (i0, i1)'s first padded position (stride phases of dims 0 and 1
  // included); for a strided last dim, phase ph's first input i2 and its offset in the row
  std::vector<int64_t> row_dst, phase_first, phase_dst;
  // the positions of a channel's stride_c numbers that copy_channel does not write (padding, the gaps of
  // uneven phases, the slack past the planes), as (first, count) runs: zeroed per channel (zero_padding)
  // instead of zeroing the whole copy first (a second pass over it: 7% of a small layer's time)
  std::vector<std::pair<int64_t, int64_t>> zero_runs;

  explicit DirectPlan(const Geometry& g) {
    constexpr int64_t L = 64 / sizeof(scalar_t);
    copied = false;
    for (int a = 0; a < 3; ++a) {
      ip[a] = g.in[a] + 2 * g.pad[a];
      pp[a] = (ip[a] + g.stride[a] - 1) / g.stride[a];
      copied = copied || g.pad[a] != 0 || g.stride[a] != 1;
    }
    phase_plane = pp[0] * pp[1] * pp[2];
    plane = g.stride[0] * g.stride[1] * g.stride[2] * phase_plane;
    Q = ((g.out[0] - 1) * pp[1] + g.out[1] - 1) * pp[2] + g.out[2];  // last output position + 1
    ntiles = (Q + TP - 1) / TP;
    // every tile reads [q0 + off, q0 + off + TP): past the plane by at most TP - 1 + (Q .. tile end) numbers
    stride_c = plane + TP + L;
    // tap offsets: padded coordinate o s + k d is phase (k d) mod s, position o + (k d) div s in that phase
    off.resize(g.K);
    int64_t t = 0;
    for (int64_t k0 = 0; k0 < g.k[0]; ++k0)
      for (int64_t k1 = 0; k1 < g.k[1]; ++k1)
        for (int64_t k2 = 0; k2 < g.k[2]; ++k2, ++t) {
          const int64_t c0 = k0 * g.dil[0], c1 = k1 * g.dil[1], c2 = k2 * g.dil[2];
          const int64_t phase = ((c0 % g.stride[0]) * g.stride[1] + c1 % g.stride[1]) * g.stride[2] + c2 % g.stride[2];
          off[t] = phase * phase_plane + ((c0 / g.stride[0]) * pp[1] + c1 / g.stride[1]) * pp[2] + c2 / g.stride[2];
        }
    run_first.assign(ntiles + 1, 0);
    for (int64_t u = 0; u < ntiles; ++u) {
      run_first[u] = static_cast<int32_t>(out_runs.size());
      for (int64_t p = 0; p < TP;) {
        const int64_t q = u * TP + p;
        const int64_t o2 = q % pp[2], o01 = q / pp[2], o1 = o01 % pp[1], o0 = o01 / pp[1];
        const int64_t row_left = pp[2] - o2;  // grid positions to the end of this grid row
        if (q >= Q || o0 >= g.out[0] || o1 >= g.out[1] || o2 >= g.out[2]) {
          p += std::min<int64_t>(row_left, TP - p);
          continue;
        }
        const int64_t len = std::min<int64_t>({g.out[2] - o2, TP - p, Q - q});
        const int32_t dst = static_cast<int32_t>((o0 * g.out[1] + o1) * g.out[2] + o2);
        OutRun* last = out_runs.size() > static_cast<size_t>(run_first[u]) ? &out_runs.back() : nullptr;
        if (last != nullptr && last->p + last->len == p && last->dst + last->len == dst) {
          last->len += static_cast<int32_t>(len);  // the grid row continues y's (a grid as wide as y's rows)
        } else {
          out_runs.push_back({static_cast<int32_t>(p), dst, static_cast<int32_t>(len)});
        }
        p += len;
      }
    }
    run_first[ntiles] = static_cast<int32_t>(out_runs.size());
    row_dst.resize(g.in[0] * g.in[1]);
    for (int64_t i0 = 0; i0 < g.in[0]; ++i0)
      for (int64_t i1 = 0; i1 < g.in[1]; ++i1) {
        const int64_t c0 = i0 + g.pad[0], c1 = i1 + g.pad[1];
        row_dst[i0 * g.in[1] + i1] =
            ((c0 % g.stride[0]) * g.stride[1] + c1 % g.stride[1]) * g.stride[2] * phase_plane +
            ((c0 / g.stride[0]) * pp[1] + c1 / g.stride[1]) * pp[2] + (g.stride[2] == 1 ? g.pad[2] : 0);
      }
    const int64_t s2 = g.stride[2];
    for (int64_t ph = 0; ph < s2; ++ph) {  // the inputs i2 with (i2 + pad) mod s = ph sit at (i2 + pad) div s
      const int64_t first = ((ph - g.pad[2]) % s2 + s2) % s2;
      phase_first.push_back(first);
      phase_dst.push_back(ph * phase_plane + (first + g.pad[2]) / s2);
    }
  }

  // zero_runs, for a caller that lays channels out in memory it did not clear (conv_direct; the grouped path
  // clears its buffer once)
  // (the gaps between the written pieces, sorted: a pass over a byte per position cost the 7x7/2 stem conv of
  // resnet50, 3x224x224 in four phase planes, 30-40 us a call)
  void find_zero_runs(const Geometry& g) {
    std::vector<std::pair<int64_t, int64_t>> written;  // [first, end) of each piece
    for_each_row(g, [&](int64_t, int64_t dst, int64_t count, int64_t) {
      if (count > 0) written.emplace_back(dst, dst + count);
    });
    std::sort(written.begin(), written.end());
    int64_t q = 0;  // everything before q is written or in a zero run
    for (const auto& piece : written) {
      if (piece.first > q) zero_runs.emplace_back(q, piece.first - q);
      q = std::max(q, piece.second);
    }
    if (stride_c > q) zero_runs.emplace_back(q, stride_c - q);
  }

  // f(source offset in the channel, destination offset in its copy, count, source step) for each piece of an
  // input row that copy_channel writes: whole rows with a unit stride, one piece per stride phase otherwise
  template <typename F>
  void for_each_row(const Geometry& g, F f) const {
    const int64_t n2 = g.in[2], rows = g.in[0] * g.in[1], s2 = g.stride[2];
    for (int64_t r = 0; r < rows; ++r) {
      if (s2 == 1) {
        f(r * n2, row_dst[r], n2, int64_t(1));
        continue;
      }
      for (int64_t ph = 0; ph < s2; ++ph)
        f(r * n2 + phase_first[ph], row_dst[r] + phase_dst[ph], (n2 - phase_first[ph] + s2 - 1) / s2, s2);
    }
  }

  // out[e]: where kept coefficient e's reads start, from its sample's (or group's) first input channel in the
  // layout the direct path reads: column col[e] = i*K + t of A is input channel i mod cin_g (cin_g = c_in, or
  // c_in/groups for the grouped path's buffer of one group) at tap offset off[t], channels cstride apart (the
  // padded copy's stride_c; g.p_in where x is read in place). By a table over the c_in*K columns (a division
  // per kept coefficient cost more than the convolution on small maps). Worked out once per input shape where
  // the caller keeps it (ipfx/ops/native.py's bind_conv: the `sources` argument), else on every call.
  void sources(const Geometry& g, const int64_t* __restrict__ col, int64_t nnz, int64_t c_in, int64_t cin_g,
               int64_t cstride, int64_t* __restrict__ out) const {
    std::vector<int64_t> col_src(c_in * g.K);
    for (int64_t i = 0; i < c_in; ++i)
      for (int64_t t = 0; t < g.K; ++t) col_src[i * g.K + t] = (i % cin_g) * cstride + off[t];
    for (int64_t e = 0; e < nnz; ++e) out[e] = col_src[col[e]];
  }
  // the caller's sources where it has them, else sources() into `own`
  const int64_t* sources_or(const int64_t* given, const Geometry& g, const at::Tensor& col, int64_t c_in,
                            int64_t cin_g, int64_t cstride, std::vector<int64_t>& own) const {
    if (given != nullptr) return given;
    own.resize(col.numel());
    sources(g, col.data_ptr<int64_t>(), col.numel(), c_in, cin_g, cstride, own.data());
    return own.data();
  }

  void zero_padding(scalar_t* __restrict__ dst) const {
    for (const auto& run : zero_runs) std::memset(dst + run.first, 0, run.second * sizeof(scalar_t));
  }

  // One input channel (g.p_in numbers at src) into its padded phase planes at dst, whose padding positions
  // are zero (never written here: a buffer zeroed once stays valid for every channel; or zero_padding). Where
  // each input row goes is worked out once per call (row_dst; phase_first/phase_dst for a strided last dim).
  void copy_channel(const Geometry& g, const scalar_t* __restrict__ src, scalar_t* __restrict__ dst) const {
    for_each_row(g, [&](int64_t from, int64_t to, int64_t count, int64_t step) {
      const scalar_t* __restrict__ sp = src + from;
      scalar_t* __restrict__ d = dst + to;
      if (step == 1) {
        for (int64_t m = 0; m < count; ++m) d[m] = sp[m];
      } else if (step == 2) {  // a constant step vectorises (the strided loads ran one number at a time)
        for (int64_t m = 0; m < count; ++m) d[m] = sp[2 * m];
      } else {
        for (int64_t m = 0; m < count; ++m) d[m] = sp[m * step];
      }
    });
  }

  // Output channel o's part of tile `tile`: acc = sum over its CSR row [e0, e1) of vals[e] * xs[src[e] ..
  // + TP), xs the tile's first grid position in the (padded) input; then y = act(acc + b + res) along the
  // tile's runs into yo (the channel's output map; ro its residual or null). xend: where the readable input
  // ends, for the one tile that may read past x's end (such a read takes a zero-padded copy: same sums, same
  // order for every position written), or null.
  void channel(const scalar_t* __restrict__ xs, const int64_t* __restrict__ src, const scalar_t* __restrict__ vals,
               int64_t e0, int64_t e1, const scalar_t* xend, scalar_t b, scalar_t* __restrict__ yo,
               const scalar_t* __restrict__ ro, int64_t tile, int64_t activation,
               const scalar_t* own_end = nullptr) const {
    using V = typename Lane<scalar_t>::V;
    constexpr int L = Lane<scalar_t>::L, NV = TP / L;
    // the chains of a 64-position tile whatever TP (conv_direct's wider tiles): the same sums, bit for bit, as
    // the 64-position tiles of the grouped path's fused pointwise conv (conv_direct_grouped's `pw`)
    constexpr int CH = chains<64 / L>();
    V acc[NV];  // the accumulators, in registers
    if (xend == nullptr) {
      sparse_accumulate<scalar_t, NV, CH>(vals, e0, e1,
                                          [&](int64_t e) { return reinterpret_cast<const V*>(xs + src[e]); }, acc);
    } else {  // a read that would pass x's end takes a copy, zeros past the end (positions never written)
      alignas(64) scalar_t edge[TP];
      sparse_accumulate<scalar_t, NV, CH>(vals, e0, e1, [&](int64_t e) {
        const scalar_t* r = xs + src[e];
        if (r + TP <= xend) return reinterpret_cast<const V*>(r);
        std::memset(edge, 0, sizeof(edge));
        if (xend > r) std::memcpy(edge, r, (xend - r) * sizeof(scalar_t));
        return reinterpret_cast<const V*>(edge);
      }, acc);
    }
    const OutRun* begin = out_runs.data() + run_first[tile];
    const OutRun* end = out_runs.data() + run_first[tile + 1];
    if (end - begin == 1 && begin->p == 0 && begin->len == TP &&
        store_tile<scalar_t, NV>(acc, b, ro != nullptr ? ro + begin->dst : nullptr, activation, yo + begin->dst))
      return;  // the tile is one whole run of y (1x1 and unpadded convs, mostly)
    alignas(64) scalar_t tmp[TP + Lane<scalar_t>::L];  // (the slack: what an overhanging vector reads)
    std::memcpy(tmp, acc, TP * sizeof(scalar_t));
    std::memset(tmp + TP, 0, Lane<scalar_t>::L * sizeof(scalar_t));
    with_activation(activation, [&](auto a) { store_runs<decltype(a)::value>(tmp, begin, end, b, ro, yo, own_end); });
  }

  // Tiles [t0, t1) of an output channel without kept coefficients: y = act((0 + b) + res) along their runs,
  // the numbers channel() writes there, without its accumulation and buffer per tile; runs that continue each
  // other in y are one span (the tiles of a 1x1 conv: one fill). Measured (2 threads, batch 1, in-process
  // A/B, 6 rounds): mobilenet_v3_large's 1x1 16->64 @112 at 95% (50 kept, most rows empty) 83.5 -> 65.5 us.
  void fill_tiles(int64_t t0, int64_t t1, scalar_t b, const scalar_t* __restrict__ ro, scalar_t* __restrict__ yo,
                  int64_t activation) const {
    const OutRun* run = out_runs.data() + run_first[t0];
    const OutRun* end = out_runs.data() + run_first[t1];
    while (run != end) {
      const int64_t dst = run->dst;
      int64_t len = run->len;
      for (++run; run != end && run->dst == dst + len; ++run) len += run->len;
      fill_channel(b, ro != nullptr ? ro + dst : nullptr, yo + dst, len, activation);
    }
  }

  // A channel without kept coefficients: y = act((0 + b) + res) over its whole map (n numbers), as channel()
  // writes it tile by tile (the same sum: +0 from the empty accumulation), in one pass. At 95% most
  // channels of a 3x3 depthwise conv keep nothing (0.95^9: 63%).
  static void fill_channel(scalar_t b, const scalar_t* __restrict__ ro, scalar_t* __restrict__ yo, int64_t n,
                           int64_t activation) {
    with_activation(activation, [&](auto a) { fill_plane<decltype(a)::value>(b, ro, yo, n); });
  }
  template <int A>
  static void fill_plane(scalar_t b, const scalar_t* __restrict__ ro, scalar_t* __restrict__ yo, int64_t n) {
    const scalar_t zero = scalar_t(0), base = zero + b;  // (+0 + -0 is +0: not b itself)
    if (ro != nullptr) {
      for (int64_t p = 0; p < n; ++p) yo[p] = activate<scalar_t, A>(base + ro[p]);
    } else {
      std::fill(yo, yo + n, activate<scalar_t, A>(base));
    }
  }

  // y = act((tmp + b) + res) along a tile's runs, one pass. Short runs (a 14-wide row is a vector and six
  // numbers) are written a whole vector at a time where the overhang stays below `own_end`: the part of y this
  // thread writes next, in order (the grouped path's channel: the next run of the same thread overwrites it);
  // null: no overhang. Measured: a 672-channel depthwise 3x3 @14 spent a quarter of its time in the two scalar
  // passes per run (sum, then activation) this replaces.
  template <int A>
  static void store_runs(const scalar_t* __restrict__ tmp, const OutRun* begin, const OutRun* end, scalar_t b,
                         const scalar_t* __restrict__ ro, scalar_t* __restrict__ yo, const scalar_t* own_end) {
    constexpr int L = Lane<scalar_t>::L;
    for (const OutRun* run = begin; run != end; ++run) {
      const scalar_t* __restrict__ t = tmp + run->p;
      scalar_t* __restrict__ yr = yo + run->dst;
      const int32_t len = run->len, whole = (len + L - 1) / L * L;
      const int32_t n = (own_end != nullptr && yr + whole <= own_end && run->p + whole <= TP + L) ? whole : len;
      epilogue_span<scalar_t, A>(t, b, ro != nullptr ? ro + run->dst : nullptr, yr, n);
    }
  }
};

// The padded, phase-split copy (where x cannot be read in place) is made a chunk of samples at a time, each
// chunk's copy used while it is in cache: up to kCopyChunkBytes (or one sample). Copied all at once, a batch's
// copy went to memory and came back (batch 32, 3x3 64->64 @56: 28 MiB). Measured (2 threads, batch 32, one
// process, 5 rounds, chunked / whole batch): at 99% 3x3 64->64 @56 0.67-0.73x, 128->128 @28 0.68-0.79x,
// 256->256 @14 0.80-0.83x, 512->512 @7 0.82-0.84x; at 95% 64->64 @56 0.82-1.13x (median 0.88), 128->128 @28
// 0.88-0.96x. 512 KiB chunks ran 2-11% slower than 2 MiB, 4 MiB 5-24% slower (L3 here: 8 MiB).
constexpr int64_t kCopyChunkBytes = 2 * 1024 * 1024;

// Grid positions per tile of the ungrouped direct path on floats: 128 (eight 512-bit vectors) where the output
// has at least kWideTileFrom positions a sample (28x28 maps and larger), else 64 (four vectors); doubles keep 64.
// A kept coefficient's weight and read offset are loaded once per tile, so a wider tile spends fewer loads per
// multiply-add; on small maps it leaves threads idle and computes more padding columns. The accumulation chains
// stay those of a 64-position tile (DirectPlan::channel), so the sums do not depend on the width. Measured (SP,
// 2 threads, AVX-512, 3 rounds of alternating processes, 128 / 64): at 95%, batch 1: 3x3 64->64 @56 0.89x, 3x3
// 128->128 @28 0.95x, 1x1 256->64 @56 0.92x; at 99%, batch 1: 64->64 @56 0.77x; at 95%, batch 32: 64->64 @56
// 0.87x, 1x1 256->64 @56 0.71x; resnet50 at 95% (its frozen program) 0.94x at batch 32, unchanged at batch 1
// (8.9-9.4 / 8.9-9.2 ms, the machine's slow phase). 128 on 14x14 maps ran 1.02x, on 7x7 1.9x (hence the
// threshold); 256 positions on 56x56 maps 1.4-1.6x slower than 128.
constexpr int64_t kWideTileFrom = 512;
// Whether conv_direct (ungrouped) runs g on 128-position tiles: what conv_cached dispatches on and what
// direct_sources lays the sources out for.
inline bool wide_direct_tile(const Geometry& g, int64_t groups, int64_t itemsize) {
  return groups == 1 && itemsize == 4 && g.p_out >= kWideTileFrom;
}

template <typename scalar_t, int TP>
void conv_direct(const at::Tensor& x, const at::Tensor& crow_t, const at::Tensor& col_t, const at::Tensor& vals_t,
                 const c10::optional<at::Tensor>& bias_t, const c10::optional<at::Tensor>& res_t, int64_t activation,
                 const int64_t* sources, const Geometry& g, at::Tensor& y) {
  const int64_t N = x.size(0), c_in = x.size(1), c_out = y.size(1);
  DirectPlan<scalar_t, TP> plan(g);
  const int64_t ntiles = plan.ntiles;
  const int64_t cstride = plan.copied ? plan.stride_c : g.p_in;
  const int64_t* crow = crow_t.data_ptr<int64_t>();
  const scalar_t* vals = vals_t.data_ptr<scalar_t>();
  const scalar_t* bias = bias_t.has_value() ? bias_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = res_t.has_value() ? res_t->data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  std::vector<int64_t> own;  // where each kept coefficient reads (DirectPlan::sources), unless the caller has them
  sources = plan.sources_or(sources, g, col_t, c_in, c_in, cstride, own);
  constexpr int64_t OB = 16;  // output channels per work unit
  const int64_t oblocks = (c_out + OB - 1) / OB;
  // tiles per work unit, run one output channel after another: with few kept coefficients per row (at most
  // kLightRow on average) the time goes to writing y (and reading the residual), and eight consecutive tiles
  // of a channel are one 2 KiB stream instead of 256-byte pieces of 16 channels; with more the input tile's
  // reuse across the block's channels (in L1) matters more. Measured (2 threads, batch 1, in-process A/B):
  // 64->256 1x1 @56 at 5% kept (3.2 a row) 1030-1395 -> 586-734 us, 128->512 1x1 @28 (6.4 a row) 394-535 ->
  // 446-701 us with eight tiles.
  constexpr int64_t kLightRow = 4;
  const int64_t TB = col_t.numel() <= kLightRow * c_out ? std::min<int64_t>(8, ntiles) : 1;
  const int64_t tblocks = (ntiles + TB - 1) / TB;
  // samples [n0, n0 + count), their input from xbase (channels cstride apart), readable up to xend
  const auto run = [&](const scalar_t* xbase, int64_t n0, int64_t count, const scalar_t* xend) {
    scalar_t* ys = yp + n0 * c_out * g.p_out;
    const scalar_t* rs = rp != nullptr ? rp + n0 * c_out * g.p_out : nullptr;
    at::parallel_for(0, count * tblocks * oblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t ob = u % oblocks, tb = (u / oblocks) % tblocks, n = u / (oblocks * tblocks);
        const int64_t t_end = std::min(ntiles, (tb + 1) * TB);
        for (int64_t o = ob * OB; o < std::min(c_out, (ob + 1) * OB); ++o) {
          const scalar_t b = bias ? bias[o] : scalar_t(0);
          scalar_t* yo = ys + (n * c_out + o) * g.p_out;
          const scalar_t* ro = rs ? rs + (n * c_out + o) * g.p_out : nullptr;
          if (crow[o] == crow[o + 1]) {  // nothing kept: act(b + res), no tile by tile
            plan.fill_tiles(tb * TB, t_end, b, ro, yo, activation);
            continue;
          }
          for (int64_t tile = tb * TB; tile < t_end; ++tile) {
            const scalar_t* xs = xbase + n * c_in * cstride + tile * TP;
            // x read in place: the last sample's last tile may read past x's end
            const bool checked = !plan.copied && n == count - 1 && tile == ntiles - 1;
            plan.channel(xs, sources, vals, crow[o], crow[o + 1], checked ? xend : nullptr, b, yo, ro, tile,
                         activation);
          }
        }
      }
    });
  };
  const scalar_t* xs = x.data_ptr<scalar_t>();
  if (!plan.copied) {
    run(xs, 0, N, xs + N * c_in * g.p_in);
    return;
  }
  plan.find_zero_runs(g);  // zero padding and stride phases laid out a chunk of samples at a time
  const int64_t sample_bytes = c_in * plan.stride_c * int64_t(sizeof(scalar_t));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kCopyChunkBytes / sample_bytes));
  at::Tensor xp_t = Recycler::instance().empty({chunk * c_in * plan.stride_c}, x.options());
  scalar_t* xp = xp_t.data_ptr<scalar_t>();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t count = std::min(chunk, N - n0);
    const scalar_t* xn = xs + n0 * c_in * g.p_in;
    at::parallel_for(0, count * c_in, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        plan.zero_padding(xp + nc * plan.stride_c);
        plan.copy_channel(g, xn + nc * g.p_in, xp + nc * plan.stride_c);
      }
    });
    run(xp, n0, count, xp + count * c_in * plan.stride_c);
  }
}

// A pointwise conv (1x1, stride 1, no padding, SP, ungrouped) whose output only a grouped conv reads, made one
// channel's map at a time inside the grouped conv (conv_direct_grouped's `pw`) instead of written whole and read
// back: mobilenet_v3_large's expansion 16->64 @112 writes 103 MB at batch 32 that its 3x3/2 depthwise conv reads
// once. Channel c of sample n is what conv_direct writes for it, by the same calls (the pointwise conv's
// DirectPlan: its tiles, runs, chains and epilogue), into a map of the caller's instead of y: the numbers the
// conv writes on the direct path, or on the gather with the same 64-position tiles.
template <typename scalar_t>
struct Pointwise {
  static constexpr int TP = 64;
  const DirectPlan<scalar_t, TP>* plan;  // the pointwise conv's, x read in place
  const scalar_t* x;
  int64_t N, c_in, c_out, p;  // x: (N, c_in, p)
  const int64_t* sources;     // its direct path's read offsets (DirectPlan::sources, channels p apart)
  const int64_t* crow;
  const scalar_t* vals;
  const scalar_t* bias;
  int64_t activation;

  // plane[0 .. p) = act(b[c] + sum_{e in row c} vals[e] * x[n, col[e], :]) (plane: room for p and a vector)
  void channel(int64_t n, int64_t c, scalar_t* __restrict__ plane) const {
    const scalar_t b = bias != nullptr ? bias[c] : scalar_t(0);
    if (crow[c + 1] == crow[c]) {
      plan->fill_tiles(0, plan->ntiles, b, nullptr, plane, activation);
      return;
    }
    const scalar_t* xs = x + n * c_in * p;
    for (int64_t tile = 0; tile < plan->ntiles; ++tile) {  // (the last sample's last tile may read past x)
      const bool checked = n == N - 1 && tile == plan->ntiles - 1;
      plan->channel(xs + tile * TP, sources, vals, crow[c], crow[c + 1], checked ? x + N * c_in * p : nullptr, b,
                    plane, nullptr, tile, activation);
    }
  }
};

template <typename scalar_t, int TP>
void conv_direct_grouped(const at::Tensor& x, const at::Tensor& crow_t, const at::Tensor& col_t,
                         const at::Tensor& vals_t, const c10::optional<at::Tensor>& bias_t,
                         const c10::optional<at::Tensor>& res_t, int64_t activation, int64_t groups,
                         const int64_t* sources, const Geometry& g, at::Tensor& y,
                         const Pointwise<scalar_t>* pw = nullptr) {
  // pw: x is the input of that pointwise conv, whose output (c_in = pw->c_out channels) this conv reads
  const int64_t N = x.size(0), c_in = pw != nullptr ? pw->c_out : x.size(1), c_out = y.size(1);
  const int64_t cin_g = c_in / groups, cout_g = c_out / groups;
  const DirectPlan<scalar_t, TP> plan(g);
  const int64_t* crow = crow_t.data_ptr<int64_t>();
  const scalar_t* vals = vals_t.data_ptr<scalar_t>();
  const scalar_t* bias = bias_t.has_value() ? bias_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = res_t.has_value() ? res_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  std::vector<int64_t> own;  // (as conv_direct's; offsets into the group's buffer)
  sources = plan.sources_or(sources, g, col_t, c_in, cin_g, plan.stride_c, own);
  at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
    Aligned<scalar_t> buf(cin_g * plan.stride_c);  // padding stays zero (copy_channel)
    Aligned<scalar_t> made(pw != nullptr ? (g.p_in + 2 * Pointwise<scalar_t>::TP) : 0, Scratch{});
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / groups, gi = u % groups;
      const int64_t o_begin = gi * cout_g, o_end = o_begin + cout_g;
      if (crow[o_end] > crow[o_begin])  // (a group that keeps nothing reads nothing: nor is its input made)
        for (int64_t i = 0; i < cin_g; ++i) {
          if (pw != nullptr) pw->channel(n, gi * cin_g + i, made.data());
          plan.copy_channel(g, pw != nullptr ? made.data() : xp + (n * c_in + gi * cin_g + i) * g.p_in,
                            buf.data() + i * plan.stride_c);
        }
      for (int64_t o = o_begin; o < o_end; ++o)
        if (crow[o + 1] == crow[o])
          plan.fill_channel(bias ? bias[o] : scalar_t(0), rp ? rp + (n * c_out + o) * g.p_out : nullptr,
                            yp + (n * c_out + o) * g.p_out, g.p_out, activation);
      for (int64_t tile = 0; tile < plan.ntiles; ++tile)
        for (int64_t o = o_begin; o < o_end; ++o)
          if (crow[o + 1] > crow[o])
            plan.channel(buf.data() + tile * TP, sources, vals, crow[o], crow[o + 1], nullptr,
                         bias ? bias[o] : scalar_t(0), yp + (n * c_out + o) * g.p_out,
                         rp ? rp + (n * c_out + o) * g.p_out : nullptr, tile, activation,
                         yp + (n * c_out + o + 1) * g.p_out);
    }
  });
}

// sum_{e in [e, e_end)} vals[e] x[col[e]] as eight partial sums (entry e into sum e mod 8, added pairwise):
// one chain of dependent multiply-adds waited 4 cycles a number. Scalar on purpose: GCC's vectorised form of
// this loop (gathers and shuffles) ran slower than the eight independent scalar chains.
template <typename scalar_t>
__attribute__((optimize("no-tree-vectorize"))) scalar_t sparse_dot(const scalar_t* __restrict__ vals,
                                                                    const int64_t* __restrict__ col, int64_t e,
                                                                    int64_t e_end, const scalar_t* __restrict__ x) {
  scalar_t p0 = 0, p1 = 0, p2 = 0, p3 = 0, p4 = 0, p5 = 0, p6 = 0, p7 = 0;
  for (; e + 8 <= e_end; e += 8) {
    p0 += vals[e] * x[col[e]];
    p1 += vals[e + 1] * x[col[e + 1]];
    p2 += vals[e + 2] * x[col[e + 2]];
    p3 += vals[e + 3] * x[col[e + 3]];
    p4 += vals[e + 4] * x[col[e + 4]];
    p5 += vals[e + 5] * x[col[e + 5]];
    p6 += vals[e + 6] * x[col[e + 6]];
    p7 += vals[e + 7] * x[col[e + 7]];
  }
  scalar_t* tail[8] = {&p0, &p1, &p2, &p3, &p4, &p5, &p6, &p7};
  for (int l = 0; e < e_end; ++e, ++l) *tail[l] += vals[e] * x[col[e]];
  return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7));
}

// y[m, o] = act(bias[o] + sum_e vals[e] x[m, col[e]] + res[m, o]) for the M rows of x (M x in_f; y, res:
// M x out_f), four rows of x per pass over a CSR row: the form for a few rows (a linear layer at batch 1, a
// pointwise conv on single-position maps such as a squeeze-excitation's), where linear_blocked's tiles and
// the conv's 64-position tiles would be mostly padding. Each output sums its CSR row in a fixed order (one
// row of x: sparse_dot's; more rows: in storage order), then
// adds the bias; threads split the output features, so results do not depend on the thread count.
template <typename scalar_t>
void linear_rows(const scalar_t* __restrict__ x, int64_t M, int64_t in_f, const int64_t* __restrict__ crow,
                 const int64_t* __restrict__ col, const scalar_t* __restrict__ vals, const scalar_t* bias,
                 const scalar_t* res, int64_t activation, int64_t out_f, scalar_t* __restrict__ y) {
  at::parallel_for(0, out_f, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t rows = std::min<int64_t>(4, M - m0);
      const scalar_t* xm = x + m0 * in_f;
      for (int64_t o = begin; o < end; ++o) {
        scalar_t acc[4] = {scalar_t(0), scalar_t(0), scalar_t(0), scalar_t(0)};
        if (rows == 1) {
          acc[0] = sparse_dot(vals, col, crow[o], crow[o + 1], xm);
        } else {
          for (int64_t e = crow[o]; e < crow[o + 1]; ++e) {
            const scalar_t w = vals[e];
            const int64_t c = col[e];
            for (int64_t m = 0; m < rows; ++m) acc[m] += w * xm[m * in_f + c];
          }
        }
        const scalar_t b = bias ? bias[o] : scalar_t(0);
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t at = (m0 + m) * out_f + o;
          y[at] = res ? acc[m] + b + res[at] : acc[m] + b;
        }
      }
      for (int64_t m = 0; m < rows; ++m) activate_run<scalar_t>(y + (m0 + m) * out_f + begin, end - begin, activation);
    }
  });
}

// A conv's output (N, c_out, *out_spatial) for input x, from the recycled memory, after checking the residual
// added in its epilogue (a contiguous CPU tensor of that shape and x's dtype), where there is one.
at::Tensor new_output(const at::Tensor& x, int64_t c_out, at::IntArrayRef out_spatial,
                      const c10::optional<at::Tensor>& residual) {
  std::vector<int64_t> shape{x.size(0), c_out};
  shape.insert(shape.end(), out_spatial.begin(), out_spatial.end());
  at::Tensor y = Recycler::instance().empty(shape, x.options());
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type() && residual->device().is_cpu(),
                "ipfx native: the residual must be a contiguous CPU tensor of the output's shape and dtype");
  return y;
}

// ipfx_native::conv(x, crow, col, vals, basis?, bias?, used, c_out, kernel, stride, padding, dilation,
//                   transposed, out_spatial, tile, residual?, activation, direct, groups)
//                   -> y = act(conv + bias + residual)
//   x: (N, c_in, *in_spatial) contiguous; crow/col/vals: CSR of A[o, i*K + j] (int64, int64, x.dtype);
//   used: uint8 (c_in*K,), 1 where some kept coefficient reads R row i*K + j; tile: 16, 32 or 64;
//   residual: contiguous, y's shape and dtype; activation: 0-5 (ipfx/ops/epilogue.py); direct: SP (no basis,
//   not transposed) by the direct sparse convolution instead of the gather (ipfx/ops/native.py decides);
//   groups: the conv's groups (A is block-diagonal either way; the direct path runs a group at a time);
//   sources: for the direct path, direct_sources(...) of this geometry, x's channels and dtype, and col (worked
//   out once per input shape by the caller), or none (then worked out here, on every call).
//   `cache`: where a bound conv keeps what depends on the input size alone (TileRunsCache), or null.
at::Tensor conv_cached(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                       const c10::optional<at::Tensor>& basis, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& used, int64_t c_out, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                       at::IntArrayRef out_spatial, int64_t tile, const c10::optional<at::Tensor>& residual,
                       int64_t activation, bool direct, int64_t groups, const c10::optional<at::Tensor>& sources,
                       TileRunsCache* cache) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "ipfx native: x must be a contiguous CPU tensor");
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong, "ipfx native: int64 CSR");
  TORCH_CHECK(vals.scalar_type() == x.scalar_type(), "ipfx native: values must have x's dtype");
  TORCH_CHECK(crow.numel() == c_out + 1, "ipfx native: crow must have c_out + 1 entries");
  const int64_t d = x.dim() - 2;
  TORCH_CHECK(d >= 1 && d <= 3 && (int64_t)kernel.size() == d && (int64_t)out_spatial.size() == d,
              "ipfx native: bad geometry");
  const Geometry g = make_geometry(x.sizes().slice(2), out_spatial, kernel, stride, padding, dilation, transposed);
  TORCH_CHECK(used.numel() == x.size(1) * g.K && used.scalar_type() == at::kByte, "ipfx native: bad used flags");
  TORCH_CHECK(g.p_in < (int64_t(1) << 31), "ipfx native: input maps of 2^31 or more positions");
  TORCH_CHECK(x.size(1) * g.K < (int64_t(1) << 31), "ipfx native: c_in * K of 2^31 or more");
  TORCH_CHECK(activation >= 0 && activation <= 5, "ipfx native: activation must be 0 to 5");
  at::Tensor y = new_output(x, c_out, out_spatial, residual);
  if (y.numel() == 0) return y;
  TORCH_CHECK(!direct || (!basis.has_value() && !transposed), "ipfx native: the direct path is for SP convolutions");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && c_out % groups == 0,
              "ipfx native: groups must divide c_in and c_out");
  TORCH_CHECK(!sources.has_value() || (direct && sources->scalar_type() == at::kLong && sources->is_contiguous() &&
                                       sources->numel() == col.numel()),
              "ipfx native: sources are the direct path's, int64, one per kept coefficient");
  const int64_t* src = sources.has_value() ? sources->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_conv", [&] {
    if (basis.has_value()) TORCH_CHECK(basis->is_contiguous() && basis->scalar_type() == x.scalar_type());
    if (bias.has_value()) TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == x.scalar_type());
    if (!basis.has_value() && !transposed && g.K == 1 && g.p_in == 1 && g.p_out == 1 && g.pad[0] == 0 &&
        g.pad[1] == 0 && g.pad[2] == 0) {
      // pointwise on single-position maps: the sparse matrix times the batch's (N, c_in) inputs (without
      // padding: with it, the one output reads a padding zero, not the input)
      linear_rows<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), crow.data_ptr<int64_t>(),
                            col.data_ptr<int64_t>(), vals.data_ptr<scalar_t>(),
                            bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                            residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr, activation, c_out,
                            y.data_ptr<scalar_t>());
      return;
    }
    if (direct && groups > 1) {  // SP, grouped: the direct sparse convolution a group at a time
      conv_direct_grouped<scalar_t, 64>(x, crow, col, vals, bias, residual, activation, groups, src, g, y);
      return;
    }
    if (direct) {  // SP: the direct sparse convolution
      if (wide_direct_tile(g, groups, sizeof(scalar_t))) {
        conv_direct<scalar_t, 128>(x, crow, col, vals, bias, residual, activation, src, g, y);
      } else {
        conv_direct<scalar_t, 64>(x, crow, col, vals, bias, residual, activation, src, g, y);
      }
      return;
    }
    switch (tile) {
      case 16:
        conv_tiled<scalar_t, 16>(x, crow, col, vals, basis, bias, used, residual, activation, g, cache, y);
        break;
      case 32:
        conv_tiled<scalar_t, 32>(x, crow, col, vals, basis, bias, used, residual, activation, g, cache, y);
        break;
      case 64:
        conv_tiled<scalar_t, 64>(x, crow, col, vals, basis, bias, used, residual, activation, g, cache, y);
        break;
      default: TORCH_CHECK(false, "ipfx native: tile must be 16, 32 or 64");
    }
  });
  return y;
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                const c10::optional<at::Tensor>& basis, const c10::optional<at::Tensor>& bias, const at::Tensor& used,
                int64_t c_out, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, bool transposed, at::IntArrayRef out_spatial, int64_t tile,
                const c10::optional<at::Tensor>& residual, int64_t activation, bool direct, int64_t groups,
                const c10::optional<at::Tensor>& sources) {
  return conv_cached(x, crow, col, vals, basis, bias, used, c_out, kernel, stride, padding, dilation, transposed,
                     out_spatial, tile, residual, activation, direct, groups, sources, nullptr);
}

// ipfx_native::direct_sources(col, c_in, groups, in_spatial, out_spatial, kernel, stride, padding, dilation,
//                             itemsize) -> sources (int64, one per kept coefficient): conv's `sources` argument
//   for the direct path on inputs (N, c_in, *in_spatial) of that element size (DirectPlan::sources).
at::Tensor direct_sources(const at::Tensor& col, int64_t c_in, int64_t groups, at::IntArrayRef in_spatial,
                          at::IntArrayRef out_spatial, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t itemsize) {
  TORCH_CHECK(col.scalar_type() == at::kLong && col.is_contiguous(), "ipfx native: int64 CSR");
  const int64_t d = in_spatial.size();
  TORCH_CHECK(d >= 1 && d <= 3 && (int64_t)kernel.size() == d && (int64_t)out_spatial.size() == d,
              "ipfx native: bad geometry");
  TORCH_CHECK(groups >= 1 && c_in % groups == 0, "ipfx native: groups must divide c_in");
  TORCH_CHECK(itemsize == 4 || itemsize == 8, "ipfx native: float32 or float64");
  const Geometry g = make_geometry(in_spatial, out_spatial, kernel, stride, padding, dilation, false);
  at::Tensor out = at::empty({col.numel()}, col.options());
  const auto fill = [&](auto plan) {
    const int64_t cstride = groups > 1 || plan.copied ? plan.stride_c : g.p_in;
    plan.sources(g, col.data_ptr<int64_t>(), col.numel(), c_in, c_in / groups, cstride, out.data_ptr<int64_t>());
  };
  if (wide_direct_tile(g, groups, itemsize)) {
    fill(DirectPlan<float, 128>(g));
  } else if (itemsize == 4) {
    fill(DirectPlan<float, 64>(g));
  } else {
    fill(DirectPlan<double, 64>(g));
  }
  return out;
}

// ipfx_native::linear(x, crow, col, vals, bias?) -> y:  y[m, o] = bias[o] + sum_e vals[e] x[m, col[e]]
//   x: (M, in) contiguous. Rows of x are taken TP at a time from x^T, so the inner loop runs over rows.
template <typename scalar_t, int TP>
void linear_blocked(const at::Tensor& xt_t, const int64_t* crow, const int64_t* col, const scalar_t* vals,
                    const scalar_t* bias, int64_t out_f, at::Tensor& yt_t) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L, NV = TP / L;
  const int64_t M = yt_t.size(1);
  const int64_t Mp = xt_t.size(1);  // row stride of x^T, padded to whole tiles by the caller
  const scalar_t* xt = xt_t.data_ptr<scalar_t>();
  scalar_t* yt = yt_t.data_ptr<scalar_t>();
  const int64_t blocks = (M + TP - 1) / TP;
  at::parallel_for(0, out_f * blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t o = u / blocks, m0 = (u % blocks) * TP, valid = std::min<int64_t>(TP, M - m0);
      V acc[NV];
      sparse_accumulate<scalar_t, NV>(vals, crow[o], crow[o + 1],
                                      [&](int64_t e) { return reinterpret_cast<const V*>(xt + col[e] * Mp + m0); }, acc);
      scalar_t tmp[TP];
      std::memcpy(tmp, acc, sizeof(tmp));
      const scalar_t b = bias ? bias[o] : scalar_t(0);
      for (int64_t p = 0; p < valid; ++p) yt[o * M + m0 + p] = tmp[p] + b;
    }
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "ipfx native: x must be a 2-d CPU tensor");
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong, "ipfx native: int64 CSR");
  TORCH_CHECK(vals.scalar_type() == x.scalar_type(), "ipfx native: values must have x's dtype");
  const int64_t out_f = crow.numel() - 1, M = x.size(0);
  if (M <= 4) {  // a few rows: one pass over the matrix per four rows, no transposes
    TORCH_CHECK(x.is_contiguous(), "ipfx native: x must be contiguous");
    at::Tensor y = at::empty({M, out_f}, x.options());
    if (y.numel() == 0) return y;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_linear_rows", [&] {
      if (bias.has_value()) TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == x.scalar_type());
      linear_rows<scalar_t>(x.data_ptr<scalar_t>(), M, x.size(1), crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                            vals.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                            nullptr, 0, out_f, y.data_ptr<scalar_t>());
    });
    return y;
  }
  const int64_t TP = M <= 8 ? 16 : 64;  // x^T rows padded with zeros to whole tiles: full-vector loads
  const int64_t Mp = (M + TP - 1) / TP * TP;
  at::Tensor xt = at::zeros({x.size(1), Mp}, x.options());
  xt.narrow(1, 0, M).copy_(x.t());
  at::Tensor yt = at::empty({out_f, M}, x.options());
  if (yt.numel() == 0) return yt.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_linear", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    if (TP == 16) {
      linear_blocked<scalar_t, 16>(xt, crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), vals.data_ptr<scalar_t>(), b,
                                   out_f, yt);
    } else {
      linear_blocked<scalar_t, 64>(xt, crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), vals.data_ptr<scalar_t>(), b,
                                   out_f, yt);
    }
  });
  return yt.t().contiguous();
}

// ipfx_native::max_pool2d(x, kernel, stride, padding, dilation, out_spatial) -> y, as aten's max_pool2d (no
// indices) for a contiguous (N, C, H, W) x: y[n, c, oh, ow] = the max over the window's positions inside x,
// taken in row-major window order with aten's rule (v > m or v is NaN: a NaN wins and stays), starting from
// -inf. aten's NCHW kernel runs one output at a time (5.8 ms for resnet50's 64x112x112 3x3/2 pool at 2
// threads, 12% of its fused forward at batch 1). Here a plane is first laid out as its windows read it
// (MaxPoolRows): rows padded with -inf where a window leaves x (a -inf never wins: v > m fails and it is not
// NaN, so the result is the same as skipping the position, to the bit) and each row's columns split by
// phase (column c at phase c mod s, index c div s), so that every window tap reads a unit-stride run, a band of
// output rows' windows at a time (kMaxPoolBandBytes); then four vectors of an output row take every tap in
// registers (max_pool_rows). Measured (resnet50's pool, 64x112x112, 3x3/2, batch 1, alternating processes):
// 419-452 us at 2 threads with strided reads, bounds per tap and a pass over the output row per tap (the
// previous version; 14% of resnet50's frozen forward at 99%), 124-134 us now (244-277 us on one thread; aten's
// channels-last kernel 135 us); batch 32 15.5 -> 5.8 ms.
// The caller (ipfx/ops/pooling.py) checks the arguments as aten would and passes the output size.
template <typename scalar_t>
struct MaxPoolRows {
  int64_t span, phase_len, row_len;  // padded rows a window spans; numbers per phase and per laid-out row
  int64_t row_step;                  // from one output row's first window to the next's: s0 rows
  int64_t top, left, step;           // padded row r is x's row r - top, phase ph's index q x's column
                                     // q step + ph - left
  std::vector<int64_t> lo, hi;       // per phase: the indices [lo, hi) that lie inside x's columns
  std::vector<int64_t> taps;         // each window tap's offset from its window's first, in row-major order
  MaxPoolRows(int64_t W, int64_t OW, const int64_t* k, const int64_t* s, const int64_t* p, const int64_t* d)
      : top(p[0]), left(p[1]), step(s[1]) {
    span = (k[0] - 1) * d[0] + 1;
    const int64_t cols = (OW - 1) * s[1] + (k[1] - 1) * d[1] + 1;  // padded columns the windows span
    phase_len = (cols + s[1] - 1) / s[1];
    row_len = s[1] * phase_len;
    row_step = s[0] * row_len;
    for (int64_t ph = 0; ph < s[1]; ++ph) {  // x column of index q: q s + ph - p1
      const int64_t off = ph - p[1];
      lo.push_back(std::min(phase_len, std::max<int64_t>(0, ceil_div(-off, s[1]))));
      hi.push_back(std::max(lo.back(), std::min(phase_len, floor_div(W - 1 - off, s[1]) + 1)));
    }
    for (int64_t i = 0; i < k[0]; ++i)
      for (int64_t j = 0; j < k[1]; ++j)  // padded column of output column ow: ow s + j d, phase (j d) mod s
        taps.push_back(i * d[0] * row_len + (j * d[1]) % s[1] * phase_len + (j * d[1]) / s[1]);
  }
  // padded rows [r0, r1) of plane x into buf, row r at (r - r0) row_len: phase ph's index q holds x[r - p0][q s
  // + ph - p1] where inside x, else -inf
  void lay_out(const scalar_t* __restrict__ x, int64_t H, int64_t W, int64_t r0, int64_t r1,
               scalar_t* __restrict__ buf) const {
    constexpr scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* __restrict__ b = buf + (r - r0) * row_len;
      const int64_t h = r - top;
      if (h < 0 || h >= H) {
        std::fill(b, b + row_len, lowest);
        continue;
      }
      const scalar_t* __restrict__ xr = x + h * W;
      for (int64_t ph = 0; ph < step; ++ph) {
        scalar_t* __restrict__ bp = b + ph * phase_len;
        const int64_t off = ph - left;  // index q reads xr[q step + off]
        std::fill(bp, bp + lo[ph], lowest);
        if (step == 1) {
          std::memcpy(bp + lo[ph], xr + lo[ph] + off, (hi[ph] - lo[ph]) * sizeof(scalar_t));
        } else if (step == 2) {  // a constant step vectorises
          for (int64_t q = lo[ph]; q < hi[ph]; ++q) bp[q] = xr[2 * q + off];
        } else {
          for (int64_t q = lo[ph]; q < hi[ph]; ++q) bp[q] = xr[q * step + off];
        }
        std::fill(bp + hi[ph], bp + phase_len, lowest);
      }
    }
  }
};

// Output rows [oh0, oh1) of one plane from its layout (MaxPoolRows::lay_out, from padded row oh0 s0 on) into y,
// four vectors of a row at a time: their running maxima stay in registers while every window tap (rows.taps, in
// row-major order) is compared in, then go to y
// (through m where the row ends mid-block: m and buf have a block's slack).
template <typename scalar_t>
void max_pool_rows(const scalar_t* __restrict__ buf, const MaxPoolRows<scalar_t>& rows, scalar_t* __restrict__ m,
                   scalar_t* __restrict__ y, int64_t oh0, int64_t oh1, int64_t OW) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L, NB = 4;
  const V lowest = V{} - std::numeric_limits<scalar_t>::infinity();
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const scalar_t* __restrict__ first = buf + (oh - oh0) * rows.row_step;
    scalar_t* __restrict__ yr = y + oh * OW;
    for (int64_t ow = 0; ow < OW; ow += NB * L) {
      V acc[NB];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[b] = lowest;
      for (const int64_t t : rows.taps) {
        const scalar_t* __restrict__ v = first + t + ow;
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          const V a = *reinterpret_cast<const V*>(v + b * L);
          acc[b] = (a > acc[b]) | (a != a) ? a : acc[b];  // (GCC leaves the scalar form of this scalar)
        }
      }
      if (ow + NB * L <= OW) {
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) *reinterpret_cast<V*>(yr + ow + b * L) = acc[b];
      } else {
        std::memcpy(m, acc, sizeof(acc));
        std::memcpy(yr + ow, m, (OW - ow) * sizeof(scalar_t));
      }
    }
  }
}

// The layout of a plane is made a band of output rows at a time, up to this many bytes (the whole plane of
// resnet50's pool, 113 rows of 114 numbers: one band; a 4096-wide image: 15 rows of a 3x3/2 pool's windows),
// so the memory a call takes stays small whatever the image.
constexpr int64_t kMaxPoolBandBytes = 256 * 1024;

at::Tensor max_pool2d(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, at::IntArrayRef out_spatial) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(),
              "ipfx native: max_pool2d takes a contiguous 4-d CPU tensor");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 &&
                  out_spatial.size() == 2,
              "ipfx native: max_pool2d takes two numbers per argument");
  for (int a = 0; a < 2; ++a)
    TORCH_CHECK(kernel[a] > 0 && stride[a] > 0 && dilation[a] > 0 && padding[a] >= 0 && out_spatial[a] > 0,
                "ipfx native: max_pool2d: bad geometry");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = out_spatial[0], OW = out_spatial[1];
  at::Tensor y = Recycler::instance().empty({N, C, OH, OW}, x.options());
  if (y.numel() == 0) return y;
  const int64_t k[2] = {kernel[0], kernel[1]}, s[2] = {stride[0], stride[1]}, p[2] = {padding[0], padding[1]},
                d[2] = {dilation[0], dilation[1]};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_max_pool2d", [&] {
    const MaxPoolRows<scalar_t> rows(W, OW, k, s, p, d);
    const int64_t row_bytes = rows.row_len * int64_t(sizeof(scalar_t));
    // output rows a band: its padded rows (band - 1) s0 + span within kMaxPoolBandBytes, at least one
    const int64_t band = std::min(OH, std::max<int64_t>(1, (kMaxPoolBandBytes / row_bytes - rows.span) / s[0] + 1));
    const int64_t B = 4 * Lane<scalar_t>::L;  // max_pool_rows' block
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      // a band's layout (with a block's slack) and a block's maxima
      std::vector<scalar_t> buf(((band - 1) * s[0] + rows.span) * rows.row_len + B), m(B);
      for (int64_t nc = begin; nc < end; ++nc)
        for (int64_t oh0 = 0; oh0 < OH; oh0 += band) {
          const int64_t oh1 = std::min(OH, oh0 + band);
          rows.lay_out(xp + nc * H * W, H, W, oh0 * s[0], (oh1 - 1) * s[0] + rows.span, buf.data());
          max_pool_rows<scalar_t>(buf.data(), rows, m.data(), yp + nc * OH * OW, oh0, oh1, OW);
        }
    });
  });
  return y;
}

// ipfx_native::channel_mean(x) -> y: y[n, c, 0, 0] = (sum of x[n, c]'s H*W numbers) / (H*W) for a contiguous
// (N, C, H, W) x: F.adaptive_avg_pool2d(x, 1), the global pool of squeeze-excite blocks and classifier heads.
// aten's runs on one thread whatever the thread count (17.7 us for 672x14x14 at 1 and 2 threads; a sum 11.8
// us at 2). Here the planes go to threads and each is summed by one in a fixed order (four vector accumulators
// over whole vectors, added pairwise, then lane by lane, then the tail), so the result does not depend on the
// number of threads; it is not aten's order, so it may differ from aten's in the last bits.
template <typename scalar_t>
scalar_t plane_sum(const scalar_t* __restrict__ x, int64_t n) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L;
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t p = 0;
  for (; p + 4 * L <= n; p += 4 * L)
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) acc[a] += *reinterpret_cast<const V*>(x + p + a * L);
  for (; p + L <= n; p += L) acc[0] += *reinterpret_cast<const V*>(x + p);
  const V both = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  scalar_t total = scalar_t(0);
  for (int l = 0; l < L; ++l) total += both[l];
  for (; p < n; ++p) total += x[p];
  return total;
}

at::Tensor channel_mean(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(),
              "ipfx native: channel_mean takes a contiguous 4-d CPU tensor");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor y = at::empty({N, C, 1, 1}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_channel_mean", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t count = static_cast<scalar_t>(HW);
    // (about 16k numbers a task: small maps take several planes per task)
    at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) yp[nc] = plane_sum<scalar_t>(xp + nc * HW, HW) / count;
    });
  });
  return y;
}

// A conv bound to one geometry and storage (ipfx/ops/native.py's bind_conv): every argument of conv() but the
// input, the residual and the activation kept here, so that a call from Python converts three arguments
// instead of twenty (pybind11 converts each tensor and list on every call). `size`, where given, is the only
// input size `sources` is right for: another size or element size is refused. It also keeps the tiled path's
// runs for the last input size (TileRunsCache).
struct BoundConv {
  at::Tensor crow, col, vals, used;
  c10::optional<at::Tensor> basis, bias, sources;
  int64_t c_out, tile, groups, itemsize;
  std::vector<int64_t> kernel, stride, padding, dilation, out_spatial, size;
  bool transposed, direct, sized;
  std::shared_ptr<TileRunsCache> runs = std::make_shared<TileRunsCache>();

  at::Tensor operator()(const at::Tensor& x, const c10::optional<at::Tensor>& residual, int64_t activation) const {
    check_size(x);
    return conv_cached(x, crow, col, vals, basis, bias, used, c_out, kernel, stride, padding, dilation, transposed,
                       out_spatial, tile, residual, activation, direct, groups, sources, runs.get());
  }

  void check_size(const at::Tensor& x) const {
    if (sized) check_size(x, size);
  }
  // the refusal of an input of another size or element size (ipfx/ops/native.py's binding_mismatch)
  void check_size(const at::Tensor& x, const std::vector<int64_t>& size) const {
    if (x.dim() != 2 + (int64_t)size.size() || x.sizes().slice(2) != at::IntArrayRef(size) ||
        (int64_t)x.element_size() != itemsize)
      throw pybind11::value_error("ipfx native: this conv was bound for inputs of size " + shape_text(size) +
                                  " and element size " + std::to_string(itemsize) + ", got " +
                                  shape_text(x.dim() >= 2 ? x.sizes().slice(2).vec() : std::vector<int64_t>{}) +
                                  " and " + std::to_string(x.element_size()));
  }

  static std::string shape_text(const std::vector<int64_t>& s) {  // as Python writes a tuple
    std::string t = "(";
    for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + (s.size() == 1 ? ",)" : ")");
  }
};

BoundConv bind_conv(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                    const c10::optional<at::Tensor>& basis, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& used, int64_t c_out, at::IntArrayRef kernel, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef out_spatial,
                    int64_t tile, bool direct, int64_t groups, const c10::optional<at::Tensor>& sources,
                    const c10::optional<std::vector<int64_t>>& size, int64_t itemsize) {
  return BoundConv{crow, col, vals, used, basis, bias, sources, c_out, tile, groups, itemsize, kernel.vec(),
                   stride.vec(), padding.vec(), dilation.vec(), out_spatial.vec(),
                   size.has_value() ? *size : std::vector<int64_t>{}, transposed, direct, size.has_value()};
}

// The largest group buffer (its input channels' padded maps, in numbers) of a grouped conv that
// pointwise_grouped runs with its producer: 256 KiB of float32, in L2 (mobilenet_v3_large's 3x3/2 depthwise
// conv on 112x112 maps: one channel of 13k numbers).
constexpr int64_t kFusedGroupMaxNumbers = 65536;

// ipfx_native::pointwise_feeds_grouped(a, b): whether pointwise_grouped runs b reading a's output (Pointwise):
// a is SP, 1x1, stride 1, unpadded, ungrouped, on maps of more than one position; b is an SP grouped conv over
// a's c_out channels of a's map, whose group buffer holds at most kFusedGroupMaxNumbers numbers; both bound for
// that map (a's output size; a bound size, where they have one) and element size, and each, run alone, sums in
// tiles of 64 positions (the direct path, or the gather with tile 64), so the pair computes the numbers the two
// convs compute one after the other.
bool pointwise_feeds_grouped(const BoundConv& a, const BoundConv& b) {
  auto every = [](const std::vector<int64_t>& v, int64_t value) {
    return std::all_of(v.begin(), v.end(), [&](int64_t e) { return e == value; });
  };
  if (a.basis.has_value() || b.basis.has_value() || a.transposed || b.transposed || a.groups != 1 || b.groups < 2)
    return false;
  if (!every(a.kernel, 1) || !every(a.stride, 1) || !every(a.padding, 0) || b.kernel.size() != a.kernel.size())
    return false;
  const std::vector<int64_t>& size = a.out_spatial;  // (a 1x1 conv's input size too)
  if ((a.sized && a.size != size) || (b.sized && b.size != size) || a.itemsize != b.itemsize) return false;
  if (!(a.direct || a.tile == 64) || !(b.direct || b.tile == 64)) return false;
  int64_t K = 1, p = 1, padded = 1;
  for (size_t d = 0; d < b.kernel.size(); ++d) {
    K *= b.kernel[d], p *= size[d];
    padded *= (size[d] + 2 * b.padding[d] + b.stride[d] - 1) / b.stride[d] * b.stride[d];
  }
  if (b.used.numel() != a.c_out * K || a.c_out % b.groups != 0 || p <= 1) return false;
  return a.c_out / b.groups * (padded + 128) <= kFusedGroupMaxNumbers;
}

// ipfx_native::pointwise_grouped(a, act_a, b, x, residual, act_b) -> b(act_a(a(x)), residual, act_b) for a pair
// that pointwise_feeds_grouped accepts, without a's output: conv_direct_grouped makes each of its channels as
// it lays the channel out (Pointwise), and not at all for a group of b that keeps no coefficient.
at::Tensor pointwise_grouped(const BoundConv& a, int64_t act_a, const BoundConv& b, const at::Tensor& x,
                             const c10::optional<at::Tensor>& residual, int64_t act_b) {
  TORCH_CHECK(pointwise_feeds_grouped(a, b), "ipfx native: pointwise_grouped takes a pair pointwise_feeds_grouped "
              "accepts");
  a.check_size(x, a.out_spatial);  // (a's map, which b was bound for: another size makes a new program)
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "ipfx native: x must be a contiguous CPU tensor");
  TORCH_CHECK(x.size(1) == a.used.numel() && a.vals.scalar_type() == x.scalar_type() &&
                  b.vals.scalar_type() == x.scalar_type(),
              "ipfx native: x must have the pointwise conv's input channels and the convs' dtype");
  TORCH_CHECK(act_a >= 0 && act_a <= 5 && act_b >= 0 && act_b <= 5, "ipfx native: activation must be 0 to 5");
  const Geometry g = make_geometry(x.sizes().slice(2), b.out_spatial, b.kernel, b.stride, b.padding, b.dilation,
                                   false);
  at::Tensor y = new_output(x, b.c_out, b.out_spatial, residual);
  if (y.numel() == 0) return y;
  const Geometry ga = make_geometry(x.sizes().slice(2), a.out_spatial, a.kernel, a.stride, a.padding, a.dilation,
                                    false);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_pointwise_grouped", [&] {
    const DirectPlan<scalar_t, 64> plan_a(ga);
    std::vector<int64_t> own;  // (a's offsets where it was bound without them: the gather)
    const int64_t* src_a = plan_a.sources_or(a.direct && a.sources.has_value() ? a.sources->data_ptr<int64_t>()
                                                                               : nullptr,
                                             ga, a.col, x.size(1), x.size(1), ga.p_in, own);
    const Pointwise<scalar_t> pw{&plan_a, x.data_ptr<scalar_t>(), x.size(0), x.size(1), a.c_out, ga.p_in, src_a,
                                 a.crow.data_ptr<int64_t>(), a.vals.data_ptr<scalar_t>(),
                                 a.bias.has_value() ? a.bias->data_ptr<scalar_t>() : nullptr, act_a};
    const int64_t* src = b.direct && b.sources.has_value() ? b.sources->data_ptr<int64_t>() : nullptr;
    conv_direct_grouped<scalar_t, 64>(x, b.crow, b.col, b.vals, b.bias, residual, act_b, b.groups, src, g, y, &pw);
  });
  return y;
}

}  // namespace

#include "blocked.h"
#include "program.h"

TORCH_LIBRARY(ipfx_native, m) {
  m.def("conv(Tensor x, Tensor crow, Tensor col, Tensor vals, Tensor? basis, Tensor? bias, Tensor used, int c_out, "
        "int[] kernel, int[] stride, int[] padding, int[] dilation, bool transposed, int[] out_spatial, int tile, "
        "Tensor? residual, int activation, bool direct, int groups=1, Tensor? sources=None) -> Tensor");
  m.def("direct_sources(Tensor col, int c_in, int groups, int[] in_spatial, int[] out_spatial, int[] kernel, "
        "int[] stride, int[] padding, int[] dilation, int itemsize) -> Tensor");
  m.def("linear(Tensor x, Tensor crow, Tensor col, Tensor vals, Tensor? bias) -> Tensor");
  m.def("max_pool2d(Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, int[] out_spatial) -> Tensor");
  m.def("channel_mean(Tensor x) -> Tensor");
  m.def("to_blocked(Tensor x) -> Tensor");
  m.def("from_blocked(Tensor xb) -> Tensor");
  m.def("max_pool2d_blocked(Tensor xb, int[] kernel, int[] stride, int[] padding, int[] dilation, "
        "int[] out_spatial) -> Tensor");
  m.def("channel_mean_blocked(Tensor xb) -> Tensor");
  m.def("conv_blocked(Tensor xb, Tensor crow, Tensor col, Tensor vals, Tensor? bias, int c_out, int[] kernel, "
        "int[] stride, int[] padding, int[] dilation, int groups, int[] out_spatial, Tensor? residual, "
        "int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(ipfx_native, CPU, m) {
  m.impl("conv", conv);
  m.impl("direct_sources", direct_sources);
  m.impl("linear", linear);
  m.impl("max_pool2d", max_pool2d);
  m.impl("channel_mean", channel_mean);
  m.impl("conv_blocked", conv_blocked);
  m.impl("to_blocked", to_blocked);
  m.impl("from_blocked", from_blocked);
  m.impl("max_pool2d_blocked", max_pool2d_blocked);
  m.impl("channel_mean_blocked", channel_mean_blocked);
}

// The same functions as a Python module, which ipfx/ops/native.py calls: a call through torch.ops parses
// its arguments by the schema and dispatches (about 15 us a call here, 5 us through pybind11), and the eager
// path calls these once per layer per forward.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv", &conv);
  pybind11::class_<BoundConv, std::shared_ptr<BoundConv>>(m, "BoundConv")
      .def("__call__", &BoundConv::operator(), pybind11::arg("x"), pybind11::arg("residual"),
           pybind11::arg("activation"));
  m.def("bind_conv", &bind_conv);
  m.def("pointwise_feeds_grouped", &pointwise_feeds_grouped);
  m.def("pointwise_grouped", &pointwise_grouped, pybind11::arg("a"), pybind11::arg("act_a"), pybind11::arg("b"),
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("act_b"));
  m.def("direct_sources", &direct_sources);
  m.def("linear", &linear);
  m.def("max_pool2d", &max_pool2d);
  m.def("channel_mean", &channel_mean);
  m.def("conv_blocked", &conv_blocked);
  m.def("runs_blocked", &runs_blocked);
  m.def("recycled_limit", [] { return Recycler::instance().limit(); });
  m.def("set_recycled_limit", [](int64_t bytes) { Recycler::instance().set_limit(bytes); });
  m.def("recycled_bytes", [] { return Recycler::instance().kept_bytes(); });
  m.def("release_recycled", [] { Recycler::instance().release(); });
  m.def("vector_bytes", [] { return kVectorBytes; });
  bind_program(m);
}
