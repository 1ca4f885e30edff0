// The direct sparse convolution (SP, 2-d, not transposed) on the batch-blocked layout (included into
// ip_conv.cpp, whose Lane, chains and activations it uses).
//
// Layout: a batch of N = nb * L samples (L: the machine vector's numbers, 16 floats with AVX-512) held as
// xb[nb][c][h][w][l] = x[nb * L + l][c][h][w]: the L samples of one position and channel are one aligned
// vector (one cache line with AVX-512). A kept coefficient C[o, i, (ky, kx)] then reads, for every output
// position, one whole vector at an offset of its own (no tap is misaligned, which the NCHW direct path's
// unaligned loads are for every tap but one in a row), and a tile of P consecutive output positions of a row
// is P such vectors at a fixed step (stride * L):
//   acc[p][l] += C[o, i, t] * xb[b][i][oh s + ky d - pad][(ow0 + p) s + kx d - pad][l].
// With padding the input is first laid out zero-padded, as the NCHW direct path's copy (the same
// multiply-adds, of zeros there).
//
// Sums, in the NCHW path's order: kept coefficient e of row o into chain (e - e_begin) mod CH (CH = the
// NCHW direct path's, chains<64 / L>()), chains added pairwise, then act((acc + b) + res). Each number of y is
// the number the NCHW direct path writes for it, bit for bit: same products, same chains, same epilogue
// (tests/test_blocked.py checks it), whatever the layout.
//
// Work: (block of samples, output row, tile of P positions) units over threads (P = kBlockedTile; the tail
// of a row by a narrower tile), each for every output channel.

namespace {

constexpr int kBlockedTile = 8;  // output positions per tile: 2 chains x 8 accumulators + the loads in 32 registers

struct BlockedGeometry {
  int64_t nb, c_in, c_out, groups, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Outputs of more bytes than this are written past the caches (streaming stores): such an output (resnet50's
// 56x56 maps of 256 channels at batch 32: 103 MB) cannot stay in cache for the next op anyway, and a plain store
// first reads each line it writes. resnet50 at batch 32 (2 threads, AMD EPYC, 32 MiB of L3 per core complex):
// 0.85x the time at 95% sparsity, 0.79x at 99%; a threshold of 32 MiB gained less. Fixed rather than read from
// sysconf, which reports a whole server's L3 (384 MiB on that machine), not the part a core shares.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// *out = v, past the caches where Stream (out: one aligned vector).
template <bool Stream, typename V>
inline void put_vector(V* out, V v) {
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (Stream && sizeof(V) == 64) return _mm512_stream_si512(reinterpret_cast<__m512i*>(out), (__m512i)v);
#endif
#if defined(__AVX__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (Stream && sizeof(V) == 32) return _mm256_stream_si256(reinterpret_cast<__m256i*>(out), (__m256i)v);
#endif
  *out = v;
}

// out[p] = act((acc[p] + b) + res[p]) for the P vectors of a tile (res: null or the residual there).
template <typename scalar_t, int P, int A, bool Stream>
inline void blocked_store(const typename Lane<scalar_t>::V* acc, scalar_t b, const scalar_t* res, scalar_t* y) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L;
  const V* r = reinterpret_cast<const V*>(res);
  V* out = reinterpret_cast<V*>(y);
  if constexpr (A == 3 || A == 4) {  // silu, gelu: the NCHW path's scalar form
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < L; ++l)
        y[p * L + l] = activate<scalar_t, A>(res != nullptr ? (acc[p][l] + b) + res[p * L + l] : acc[p][l] + b);
  } else if (res != nullptr) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) put_vector<Stream>(out + p, activate_vector<scalar_t, A>((acc[p] + b) + r[p]));
  } else {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) put_vector<Stream>(out + p, activate_vector<scalar_t, A>(acc[p] + b));
  }
}

// One tile: P output positions of one row, output channel with CSR row [e0, e1): out = the sum, in the NCHW
// paths' chains (sparse_accumulate). x: the input at the tile's first window (its (oh s, ow s) in the padded
// input); off[e]: where kept coefficient e reads from there (its channel's plane + (ky d W + kx d) L numbers);
// positions `step` numbers apart.
template <typename scalar_t, int P, int CH>
inline void blocked_tile(const scalar_t* __restrict__ vals, int64_t e0, int64_t e1, const int64_t* __restrict__ off,
                         const scalar_t* __restrict__ x, int64_t step, typename Lane<scalar_t>::V* out) {
  using V = typename Lane<scalar_t>::V;
  sparse_accumulate<scalar_t, P, CH>(vals, e0, e1, [&](int64_t e) { return reinterpret_cast<const V*>(x + off[e]); },
                                     out, step / Lane<scalar_t>::L);
}

template <typename scalar_t, int P>
inline void blocked_tile_store(const scalar_t* vals, int64_t e0, int64_t e1, const int64_t* off, const scalar_t* x,
                               int64_t step, scalar_t b, const scalar_t* res, scalar_t* y, int64_t activation,
                               bool stream) {
  using V = typename Lane<scalar_t>::V;
  constexpr int L = Lane<scalar_t>::L;
  V acc[P];
  blocked_tile<scalar_t, P, chains<64 / L>()>(vals, e0, e1, off, x, step, acc);
  with_activation(activation, [&](auto a) {
    if (stream)
      blocked_store<scalar_t, P, decltype(a)::value, true>(acc, b, res, y);
    else
      blocked_store<scalar_t, P, decltype(a)::value, false>(acc, b, res, y);
  });
}

// The tail of a row: q < kBlockedTile positions, by the tile of that width.
template <typename scalar_t, int P = kBlockedTile - 1>
inline void blocked_tail(int64_t q, const scalar_t* vals, int64_t e0, int64_t e1, const int64_t* off,
                         const scalar_t* x, int64_t step, scalar_t b, const scalar_t* res, scalar_t* y,
                         int64_t activation, bool stream) {
  if constexpr (P >= 1) {
    if (q == P) {
      blocked_tile_store<scalar_t, P>(vals, e0, e1, off, x, step, b, res, y, activation, stream);
      return;
    }
    blocked_tail<scalar_t, P - 1>(q, vals, e0, e1, off, x, step, b, res, y, activation, stream);
  }
}

// y (nb, c_out, OH, OW, L) = act(conv(xb) + bias + res), xb (nb, c_in, H, W, L); CSR columns i*K + t.
// With padding, xb is first laid out zero-padded (plane by plane, threads splitting the planes), so that
// every tile reads inside its input: tiles checking each position at the border ran 3x3 256->256 @14 at 95%
// (batch 32, 2 threads) 1.6x and 512->512 @7 2.1x slower than the NCHW direct path (every tile of a 14- or
// 7-wide row has a border column); padded, 0.68x and 0.72x of it.
template <typename scalar_t>
void conv_blocked_impl(const at::Tensor& xb, const at::Tensor& crow_t, const at::Tensor& col_t,
                       const at::Tensor& vals_t, const scalar_t* bias, const scalar_t* rp, int64_t activation,
                       const BlockedGeometry& g, at::Tensor& y) {
  constexpr int L = Lane<scalar_t>::L, P = kBlockedTile;
  if (g.ph > 0 || g.pw > 0) {
    BlockedGeometry padded = g;
    padded.H += 2 * g.ph, padded.W += 2 * g.pw, padded.ph = padded.pw = 0;
    at::Tensor xpad = Recycler::instance().empty({g.nb, g.c_in, padded.H, padded.W, L}, xb.options());
    const scalar_t* src = xb.data_ptr<scalar_t>();
    scalar_t* dst = xpad.data_ptr<scalar_t>();
    const int64_t row = g.W * L, prow = padded.W * L;
    at::parallel_for(0, g.nb * g.c_in, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        scalar_t* d = dst + bc * padded.H * prow;
        const scalar_t* sp = src + bc * g.H * row;
        std::memset(d, 0, g.ph * prow * sizeof(scalar_t));
        for (int64_t h = 0; h < g.H; ++h) {
          scalar_t* dr = d + (g.ph + h) * prow;
          std::memset(dr, 0, g.pw * L * sizeof(scalar_t));
          std::memcpy(dr + g.pw * L, sp + h * row, row * sizeof(scalar_t));
          std::memset(dr + g.pw * L + row, 0, g.pw * L * sizeof(scalar_t));
        }
        std::memset(d + (g.ph + g.H) * prow, 0, g.ph * prow * sizeof(scalar_t));
      }
    });
    conv_blocked_impl<scalar_t>(xpad, crow_t, col_t, vals_t, bias, rp, activation, padded, y);
    return;
  }
  const int64_t* crow = crow_t.data_ptr<int64_t>();
  const int64_t* col = col_t.data_ptr<int64_t>();
  const scalar_t* vals = vals_t.data_ptr<scalar_t>();
  const scalar_t* xp = xb.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t K = g.kh * g.kw, nnz = col_t.numel(), plane = g.H * g.W * L, step = g.sw * L;
  std::vector<int64_t> off(nnz);  // where kept coefficient e reads from its window's first position
  for (int64_t e = 0; e < nnz; ++e) {
    const int64_t i = col[e] / K, t = col[e] % K;
    off[e] = i * plane + ((t / g.kw) * g.dh * g.W + (t % g.kw) * g.dw) * L;
  }
  // work units: (sample block, output row, tile of P positions), each for every output channel, so that the
  // tile's input (its rows' (P - 1) sw + (kw - 1) dw + 1 columns in every channel) is read from L2 by all
  const int64_t tiles = (g.OW + P - 1) / P;
  const bool stream = y.nbytes() > kStreamBytes;
  at::parallel_for(0, g.nb * g.OH * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t tile = u % tiles, oh = (u / tiles) % g.OH, b = u / (tiles * g.OH);
      const int64_t ow = tile * P, q = std::min<int64_t>(P, g.OW - ow);
      const scalar_t* x = xp + b * g.c_in * plane + (oh * g.sh * g.W + ow * g.sw) * L;
      for (int64_t o = 0; o < g.c_out; ++o) {
        const scalar_t bo = bias != nullptr ? bias[o] : scalar_t(0);
        const int64_t at = (((b * g.c_out + o) * g.OH + oh) * g.OW + ow) * L;
        const scalar_t* ro = rp != nullptr ? rp + at : nullptr;
        if (q == P)
          blocked_tile_store<scalar_t, P>(vals, crow[o], crow[o + 1], off.data(), x, step, bo, ro, yp + at,
                                          activation, stream);
        else
          blocked_tail<scalar_t>(q, vals, crow[o], crow[o + 1], off.data(), x, step, bo, ro, yp + at, activation,
                                 stream);
      }
    }
#if defined(__x86_64__) || defined(__i386__)
    if (stream) _mm_sfence();  // the streaming stores reach memory before another thread reads them
#endif
  });
}

// The checks of conv_blocked's arguments but the CSR's (a bound conv's are its own); y from the recycled memory.
at::Tensor blocked_output(const at::Tensor& xb, int64_t c_out, const BlockedGeometry& g,
                          const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(xb.device().is_cpu() && xb.is_contiguous() && xb.dim() == 5,
              "ipfx native: the blocked layout is a contiguous CPU (nb, c, h, w, lanes) tensor");
  AT_DISPATCH_FLOATING_TYPES(xb.scalar_type(), "ipfx_native_conv_blocked", [&] {
    TORCH_CHECK(xb.size(4) == Lane<scalar_t>::L, "ipfx native: the blocked layout has ", Lane<scalar_t>::L,
                " lanes for this dtype on this machine, got ", xb.size(4));
  });
  at::Tensor y = Recycler::instance().empty({g.nb, c_out, g.OH, g.OW, xb.size(4)}, xb.options());
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == xb.scalar_type() && residual->device().is_cpu(),
                "ipfx native: the residual must be a contiguous CPU tensor of the output's shape and dtype");
  return y;
}

// The geometry of a 2-d conv on xb, after checking it (out_spatial: the output's size, as given).
BlockedGeometry blocked_geometry(const at::Tensor& xb, int64_t c_out, int64_t groups, at::IntArrayRef kernel,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 at::IntArrayRef out_spatial) {
  TORCH_CHECK(xb.dim() == 5, "ipfx native: the blocked layout is a (nb, c, h, w, lanes) tensor");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 &&
                  out_spatial.size() == 2,
              "ipfx native: conv_blocked is 2-d");
  TORCH_CHECK(groups >= 1 && xb.size(1) % groups == 0 && c_out % groups == 0,
              "ipfx native: groups must divide c_in and c_out");
  for (int a = 0; a < 2; ++a) {
    TORCH_CHECK(kernel[a] >= 1 && stride[a] >= 1 && dilation[a] >= 1 && padding[a] >= 0, "ipfx native: bad geometry");
    const int64_t span = xb.size(2 + a) + 2 * padding[a] - dilation[a] * (kernel[a] - 1) - 1;
    TORCH_CHECK(out_spatial[a] == (span < 0 ? 0 : span / stride[a] + 1),
                "ipfx native: out_spatial does not match the input and geometry");
  }
  return BlockedGeometry{xb.size(0), xb.size(1), c_out, groups, xb.size(2), xb.size(3), out_spatial[0],
                         out_spatial[1], kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
                         dilation[0], dilation[1]};
}

at::Tensor run_blocked(const at::Tensor& xb, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                       const c10::optional<at::Tensor>& bias, const BlockedGeometry& g,
                       const c10::optional<at::Tensor>& residual, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 5, "ipfx native: activation must be 0 to 5");
  at::Tensor y = blocked_output(xb, g.c_out, g, residual);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(xb.scalar_type(), "ipfx_native_conv_blocked", [&] {
    conv_blocked_impl<scalar_t>(xb, crow, col, vals, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr, activation, g, y);
  });
  return y;
}

// ipfx_native::conv_blocked(xb, crow, col, vals, bias?, c_out, kernel, stride, padding, dilation, groups,
//                           out_spatial, residual?, activation) -> yb
//   xb: (nb, c_in, H, W, L) contiguous (to_blocked); CSR of A[o, i*K + t] (block-diagonal for groups); the
//   residual in y's layout. The direct SP convolution on the batch-blocked layout (above).
at::Tensor conv_blocked(const at::Tensor& xb, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                        const c10::optional<at::Tensor>& bias, int64_t c_out, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        at::IntArrayRef out_spatial, const c10::optional<at::Tensor>& residual, int64_t activation) {
  const BlockedGeometry g = blocked_geometry(xb, c_out, groups, kernel, stride, padding, dilation, out_spatial);
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong && crow.is_contiguous() &&
                  col.is_contiguous() && crow.numel() == c_out + 1 && col.numel() == vals.numel(),
              "ipfx native: int64 CSR with c_out + 1 row starts and a column per value");
  TORCH_CHECK(vals.scalar_type() == xb.scalar_type() && vals.is_contiguous(), "ipfx native: values must have x's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == xb.scalar_type() &&
                                    bias->numel() == c_out),
              "ipfx native: bias must be contiguous, of x's dtype, one per output channel");
  const int64_t K = g.kh * g.kw;
  if (col.numel() > 0) {
    const int64_t* r = crow.data_ptr<int64_t>();
    for (int64_t o = 0; o < c_out; ++o) TORCH_CHECK(r[o] <= r[o + 1], "ipfx native: CSR rows out of order");
    TORCH_CHECK(r[0] == 0 && r[c_out] == col.numel(), "ipfx native: CSR rows do not cover the values");
    TORCH_CHECK(col.min().item<int64_t>() >= 0 && col.max().item<int64_t>() < g.c_in * K,
                "ipfx native: a CSR column outside c_in * K");
  }
  return run_blocked(xb, crow, col, vals, bias, g, residual, activation);
}

// ipfx_native::to_blocked(x) -> xb: (N, C, *S) contiguous, N a multiple of the lanes L -> (N / L, C, *S, L).
at::Tensor to_blocked(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "ipfx native: to_blocked takes a CPU tensor of 2 or more dims");
  int64_t L = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ipfx_native_to_blocked", [&] { L = Lane<scalar_t>::L; });
  TORCH_CHECK(x.size(0) % L == 0, "ipfx native: to_blocked needs a batch that is a multiple of ", L);
  std::vector<int64_t> shape{x.size(0) / L, L};
  for (int64_t a = 1; a < x.dim(); ++a) shape.push_back(x.size(a));
  return x.reshape(shape).movedim(1, -1).contiguous();
}

// ipfx_native::from_blocked(xb) -> x: the inverse of to_blocked.
at::Tensor from_blocked(const at::Tensor& xb) {
  TORCH_CHECK(xb.device().is_cpu() && xb.dim() >= 3, "ipfx native: from_blocked takes a blocked CPU tensor");
  std::vector<int64_t> shape{xb.size(0) * xb.size(-1)};
  for (int64_t a = 1; a + 1 < xb.dim(); ++a) shape.push_back(xb.size(a));
  return xb.movedim(-1, 1).reshape(shape).contiguous();
}

// ipfx_native::max_pool2d_blocked(xb, kernel, stride, padding, dilation, out_spatial) -> yb: max_pool2d (as the
// NCHW op computes it: taps in row-major order, a NaN wins, padding never does) on the blocked layout, a
// vector of samples at a time.
at::Tensor max_pool2d_blocked(const at::Tensor& xb, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef out_spatial) {
  TORCH_CHECK(xb.device().is_cpu() && xb.dim() == 5 && xb.is_contiguous(),
              "ipfx native: max_pool2d_blocked takes a contiguous blocked CPU tensor");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 &&
                  out_spatial.size() == 2,
              "ipfx native: max_pool2d_blocked takes two numbers per argument");
  for (int a = 0; a < 2; ++a)
    TORCH_CHECK(kernel[a] > 0 && stride[a] > 0 && dilation[a] > 0 && padding[a] >= 0 && out_spatial[a] > 0,
                "ipfx native: max_pool2d_blocked: bad geometry");
  const int64_t nb = xb.size(0), C = xb.size(1), H = xb.size(2), W = xb.size(3), OH = out_spatial[0],
                OW = out_spatial[1];
  at::Tensor y = Recycler::instance().empty({nb, C, OH, OW, xb.size(4)}, xb.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(xb.scalar_type(), "ipfx_native_max_pool2d_blocked", [&] {
    using V = typename Lane<scalar_t>::V;
    constexpr int L = Lane<scalar_t>::L;
    TORCH_CHECK(xb.size(4) == L, "ipfx native: the blocked layout has ", L, " lanes here, got ", xb.size(4));
    const scalar_t* xp = xb.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, nb * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const V* x = reinterpret_cast<const V*>(xp + bc * H * W * L);
        V* out = reinterpret_cast<V*>(yp + bc * OH * OW * L);
        for (int64_t oh = 0; oh < OH; ++oh)
          for (int64_t ow = 0; ow < OW; ++ow) {
            V acc = V{} - std::numeric_limits<scalar_t>::infinity();
            for (int64_t i = 0; i < kernel[0]; ++i) {
              const int64_t h = oh * stride[0] - padding[0] + i * dilation[0];
              if (h < 0 || h >= H) continue;
              for (int64_t j = 0; j < kernel[1]; ++j) {
                const int64_t w = ow * stride[1] - padding[1] + j * dilation[1];
                if (w < 0 || w >= W) continue;
                const V a = x[h * W + w];
                acc = (a > acc) | (a != a) ? a : acc;
              }
            }
            out[oh * OW + ow] = acc;
          }
      }
    });
  });
  return y;
}

// ipfx_native::channel_mean_blocked(xb) -> y: channel_mean of the blocked xb, as an ordinary (N, C, 1, 1) tensor:
// each sample's plane summed in plane_sum's order (position q into accumulator (q / L) mod 4, lane q mod L, while
// whole groups of 4 L positions last, then into accumulator 0; the accumulators added pairwise, their lanes in
// order, then the positions past the last whole vector), so each number is channel_mean's, bit for bit.
at::Tensor channel_mean_blocked(const at::Tensor& xb) {
  TORCH_CHECK(xb.device().is_cpu() && xb.dim() == 5 && xb.is_contiguous(),
              "ipfx native: channel_mean_blocked takes a contiguous blocked CPU tensor");
  const int64_t nb = xb.size(0), C = xb.size(1), HW = xb.size(2) * xb.size(3);
  at::Tensor y = at::empty({nb * xb.size(4), C, 1, 1}, xb.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(xb.scalar_type(), "ipfx_native_channel_mean_blocked", [&] {
    using V = typename Lane<scalar_t>::V;
    constexpr int L = Lane<scalar_t>::L;
    TORCH_CHECK(xb.size(4) == L, "ipfx native: the blocked layout has ", L, " lanes here, got ", xb.size(4));
    const scalar_t* xp = xb.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t count = static_cast<scalar_t>(HW);
    const int64_t n4 = HW / (4 * L) * (4 * L), n1 = HW / L * L;
    at::parallel_for(0, nb * C, 1, [&](int64_t begin, int64_t end) {
      V acc[4][L];
      for (int64_t bc = begin; bc < end; ++bc) {
        const V* x = reinterpret_cast<const V*>(xp + bc * HW * L);
        for (int a = 0; a < 4; ++a)
          for (int l = 0; l < L; ++l) acc[a][l] = V{};
        int64_t q = 0;
        for (; q < n4; ++q) acc[(q / L) % 4][q % L] += x[q];
        for (; q < n1; ++q) acc[0][q % L] += x[q];
        V total = V{} + scalar_t(0);
        for (int l = 0; l < L; ++l) total += (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
        for (; q < HW; ++q) total += x[q];
        const int64_t b = bc / C, c = bc % C;
        for (int l = 0; l < L; ++l) yp[((b * L + l) * C + c)] = total[l] / count;
      }
    });
  });
  return y;
}

}  // namespace

namespace {

// Whether a bound conv runs on the blocked layout (bound_blocked): an SP 2-d conv (not transposed) bound for one
// input size; not the single-position pointwise form (a squeeze-excite's: its input is a channel mean, NCHW).
// Its numbers are those of the NCHW direct path, bit for bit; a conv the NCHW call runs on the gather path
// (ipfx/ops/native.py's direct_applies: small maps, strides) sums the same products in another order there.
bool runs_blocked(const BoundConv& c) {
  if (c.basis.has_value() || c.transposed || c.kernel.size() != 2 || !c.sized || c.groups != 1) return false;
  const bool single = c.size[0] * c.size[1] == 1 && c.kernel[0] * c.kernel[1] == 1 && c.padding[0] == 0 &&
                      c.padding[1] == 0;
  return !single;
}

// The bound conv `c` on a blocked input (its size and element size checked as the NCHW call checks them).
at::Tensor bound_blocked(const BoundConv& c, const at::Tensor& xb, const c10::optional<at::Tensor>& residual,
                         int64_t activation) {
  TORCH_CHECK(runs_blocked(c), "ipfx native: this conv does not run on the blocked layout");
  if (xb.dim() != 5 || xb.size(2) != c.size[0] || xb.size(3) != c.size[1] || (int64_t)xb.element_size() != c.itemsize)
    throw pybind11::value_error("ipfx native: this conv was bound for inputs of size " + BoundConv::shape_text(c.size) +
                                " and element size " + std::to_string(c.itemsize) + ", got a blocked " +
                                BoundConv::shape_text(xb.sizes().vec()) + " and " +
                                std::to_string(xb.element_size()));
  const BlockedGeometry g =
      blocked_geometry(xb, c.c_out, c.groups, c.kernel, c.stride, c.padding, c.dilation, c.out_spatial);
  return run_blocked(xb, c.crow, c.col, c.vals, c.bias, g, residual, activation);
}

}  // namespace
