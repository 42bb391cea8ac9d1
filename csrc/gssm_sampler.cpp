// Fast GSSM sampler: the same draws as the numpy reference in nanollama/data/gssm.py, bit for bit;
// and the CPU forward algorithm behind GSSM.nll (nanollama/data/hmm.py describes the layout).
//
// Randomness is counter-based (SplitMix64's finaliser over a per-sequence key and a per-draw
// counter), so each sequence is sampled independently of the others: the batch is split across
// threads and the result does not depend on how many there are. Kernel tables arrive as float64
// numpy buffers prepared in Python; only pybind11's numpy API is used (no torch ABI).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A (Bk, rows, dim) float64 buffer: Bk == 1 when shared by the batch, else one slice per sequence.
struct Table {
  const double* data;
  int64_t batch, rows, dim;
  const double* row(int64_t b, int64_t r) const { return data + ((batch == 1 ? 0 : b) * rows + r) * dim; }
};

struct Node {
  int64_t dim;
  std::vector<int64_t> inputs;  // topological positions of the inputs
  std::vector<bool> prev;       // read at the previous step (a hidden node's own state)
  bool table;                   // one cumulative table over the joint input, or factors multiplied at run time
  std::vector<Table> arrays;
};

// First state k with cum[k] > v (cum is non-decreasing), clamped to the last state: the same as
// numpy's min(count(cum <= v), dim - 1).
inline int64_t pick(const double* cum, int64_t dim, double u) {
  const double v = u * cum[dim - 1];
  const int64_t k = std::upper_bound(cum, cum + dim, v) - cum;
  return k < dim ? k : dim - 1;
}

void sample_range(const std::vector<Node>& nodes, uint64_t key, int64_t b0, int64_t b1, int64_t seq_len,
                  int64_t* states) {
  const int64_t n_nodes = static_cast<int64_t>(nodes.size());
  int64_t max_dim = 1;
  for (const Node& n : nodes) max_dim = std::max(max_dim, n.dim);
  std::vector<int64_t> prev(n_nodes), cur(n_nodes);
  std::vector<double> w(max_dim);
  for (int64_t b = b0; b < b1; ++b) {
    const uint64_t seq_key = mix(key + static_cast<uint64_t>(b + 1) * kGolden);
    std::fill(prev.begin(), prev.end(), 0);  // every hidden node starts in state 0
    int64_t* out = states + b * seq_len * n_nodes;
    for (int64_t t = 0; t < seq_len; ++t) {
      for (int64_t j = 0; j < n_nodes; ++j) {
        const Node& node = nodes[j];
        const uint64_t z = mix(seq_key + static_cast<uint64_t>(t * n_nodes + j + 1) * kGolden);
        const double u = static_cast<double>(z >> 11) * 0x1p-53;
        const size_t n_in = node.inputs.size();
        if (node.table) {
          int64_t row = 0;
          for (size_t i = 0; i < n_in; ++i) {
            const int64_t s = node.prev[i] ? prev[node.inputs[i]] : cur[node.inputs[i]];
            row = row * nodes[node.inputs[i]].dim + s;
          }
          cur[j] = pick(node.arrays[0].row(b, row), node.dim, u);
        } else {
          // multiply the factor rows left to right, then accumulate: numpy's w0 * w1 * ... and cumsum
          for (size_t i = 0; i < n_in; ++i) {
            const int64_t s = node.prev[i] ? prev[node.inputs[i]] : cur[node.inputs[i]];
            const double* r = node.arrays[i].row(b, s);
            if (i == 0)
              std::copy(r, r + node.dim, w.begin());
            else
              for (int64_t k = 0; k < node.dim; ++k) w[k] *= r[k];
          }
          double acc = 0.0;
          for (int64_t k = 0; k < node.dim; ++k) w[k] = acc += w[k];
          cur[j] = pick(w.data(), node.dim, u);
        }
      }
      std::copy(cur.begin(), cur.end(), out + t * n_nodes);
      std::swap(prev, cur);
    }
  }
}

// nodes: [(dim, inputs, prev, kind, arrays)] in topological order; states: int64 (B, T, n_nodes), written.
// An output buffer must be written where the caller sees it: refuse anything pybind11 would copy.
template <typename T>
T* output(py::array& a, const char* name) {
  if (!a.dtype().is(py::dtype::of<T>()) || !(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string(name) + " must be a writeable C-contiguous array of the right dtype");
  return static_cast<T*>(a.mutable_data());
}

void sample(const py::list& spec, uint64_t key, py::array states, int threads) {
  std::vector<Node> nodes;
  std::vector<py::array_t<double, py::array::c_style>> keep;  // hold the buffers while we read them
  if (states.ndim() != 3) throw std::invalid_argument("states must be (B, T, n_nodes)");
  const int64_t batch = states.shape(0), seq_len = states.shape(1);
  if (states.shape(2) != static_cast<int64_t>(spec.size()))
    throw std::invalid_argument("states.shape[2] must equal the number of nodes");
  for (const py::handle& item : spec) {
    auto tup = item.cast<py::tuple>();
    Node n;
    n.dim = tup[0].cast<int64_t>();
    n.inputs = tup[1].cast<std::vector<int64_t>>();
    n.prev = tup[2].cast<std::vector<bool>>();
    const std::string kind = tup[3].cast<std::string>();
    if (kind != "table" && kind != "factors") throw std::invalid_argument("node kind must be table or factors");
    n.table = kind == "table";
    for (const py::handle& a : tup[4].cast<py::list>()) {
      auto arr = py::array_t<double, py::array::c_style>::ensure(a);
      if (!arr || arr.ndim() != 3 || arr.shape(2) != n.dim) throw std::invalid_argument("bad kernel array");
      if (arr.shape(0) != 1 && arr.shape(0) != batch) throw std::invalid_argument("kernel batch must be 1 or B");
      keep.push_back(arr);
      n.arrays.push_back({arr.data(), arr.shape(0), arr.shape(1), arr.shape(2)});
    }
    const size_t expected = n.table ? 1 : n.inputs.size();
    if (n.arrays.size() != expected || n.prev.size() != n.inputs.size())
      throw std::invalid_argument("node arrays do not match its inputs");
    for (int64_t i : n.inputs)
      if (i < 0 || i >= static_cast<int64_t>(spec.size())) throw std::invalid_argument("input index out of range");
    nodes.push_back(std::move(n));
  }
  int64_t* out = output<int64_t>(states, "states");
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(threads, batch));
  py::gil_scoped_release release;
  if (n_threads == 1) {
    sample_range(nodes, key, 0, batch, seq_len, out);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < n_threads; ++i) {
    const int64_t b0 = batch * i / n_threads, b1 = batch * (i + 1) / n_threads;
    pool.emplace_back(sample_range, std::cref(nodes), key, b0, b1, seq_len, out);
  }
  for (std::thread& th : pool) th.join();
}

// ----------------------------------------------------------------------------- forward algorithm
//
// Each thread takes blocks of kBlock sequences and runs them through all steps with no
// synchronisation. Within a block the belief over the joint hidden state (hidden axes in
// topological order) is stored state-major, sequence-minor, so every inner loop runs over the
// block's sequences (contiguous, vectorisable). A move views the belief as (L, d, R) and applies
// one (d', d) matrix per l (the matrix reads the parents' states off l); the emission multiplies
// state z by E[x, pidx[z]] (pidx: z's parents' joint state).

constexpr int64_t kBlock = 16;

struct Move {
  const double* mats;  // (L, d, d) shared, or (B, L, d, d) per sequence
  int64_t left, d, right;
  bool batched;
};

struct ForwardArgs {
  std::vector<Move> moves;
  const double* emit;  // (Bk, V, P)
  int64_t emit_batch, vocab, parents;
  const int64_t* pidx;  // (S,)
  int64_t states;
  const int64_t* tokens;  // (B, T)
  int64_t batch, seq_len;
  double* out;  // (B, T)
};

// The hot loops, compiled twice where the compiler can: for AVX2 + FMA (chosen at load time on
// CPUs that have them) and for the baseline ISA, so one portable build runs at full width.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)  // ifuncs: glibc
#define NANOLLAMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NANOLLAMA_CLONES
#endif

// setup.py turns FMA contraction off for the bit-exact sampler; the forward may fuse (and round less).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif
// A move with shared matrices and a node of D states, D known at compile time: W lanes of the D
// input states sit in registers while the D outputs are accumulated and stored once (W shrinks
// as D grows so that inputs and accumulators still fit the 16 vector registers).
template <int D, int W = (D <= 4 ? 8 : 4)>
inline void move_shared(const double* mats, const double* in, double* out, int64_t left, int64_t run) {
  for (int64_t l = 0; l < left; ++l) {
    const double* m = mats + l * D * D;
    const double* src = in + l * D * run;
    double* dst = out + l * D * run;
    for (int64_t i = 0; i < run; i += W) {
      double x[D][W];
      for (int s = 0; s < D; ++s)
        for (int j = 0; j < W; ++j) x[s][j] = src[s * run + i + j];
      for (int s2 = 0; s2 < D; ++s2) {
        double acc[W] = {};
        for (int s = 0; s < D; ++s)
          for (int j = 0; j < W; ++j) acc[j] += m[s2 * D + s] * x[s][j];
        for (int j = 0; j < W; ++j) dst[s2 * run + i + j] = acc[j];
      }
    }
  }
}

NANOLLAMA_CLONES
void forward_block(const ForwardArgs& a, int64_t b0, int64_t n, std::vector<double>& belief, std::vector<double>& next,
                   std::vector<double>& like) {
  const int64_t S = a.states;
  std::fill(belief.begin(), belief.end(), 0.0);
  for (int64_t j = 0; j < n; ++j) belief[j] = 1.0;  // every hidden node starts in state 0
  double p[kBlock];
  for (int64_t t = 0; t < a.seq_len; ++t) {
    for (const Move& mv : a.moves) {
      const int64_t d = mv.d, R = mv.right;
      const int64_t mat_stride = mv.left * d * d;  // between sequences, when batched
      const int64_t run = R * kBlock;  // the contiguous (r, sequence) run one matrix entry scales
      if (!mv.batched && (d <= 8 || d == 16)) {
        double* o = next.data();
        const double* in = belief.data();
        switch (d) {
          case 1: move_shared<1>(mv.mats, in, o, mv.left, run); break;
          case 2: move_shared<2>(mv.mats, in, o, mv.left, run); break;
          case 3: move_shared<3>(mv.mats, in, o, mv.left, run); break;
          case 4: move_shared<4>(mv.mats, in, o, mv.left, run); break;
          case 5: move_shared<5>(mv.mats, in, o, mv.left, run); break;
          case 6: move_shared<6>(mv.mats, in, o, mv.left, run); break;
          case 7: move_shared<7>(mv.mats, in, o, mv.left, run); break;
          case 8: move_shared<8>(mv.mats, in, o, mv.left, run); break;
          default: move_shared<16>(mv.mats, in, o, mv.left, run); break;
        }
        belief.swap(next);
        continue;
      }
      for (int64_t l = 0; l < mv.left; ++l) {
        for (int64_t s2 = 0; s2 < d; ++s2) {
          double* o = next.data() + (l * d + s2) * run;
          for (int64_t i = 0; i < run; ++i) o[i] = 0.0;
          for (int64_t s = 0; s < d; ++s) {
            const double* in = belief.data() + (l * d + s) * run;
            const int64_t at = (l * d + s2) * d + s;
            if (!mv.batched) {
              const double w = mv.mats[at];
              for (int64_t i = 0; i < run; ++i) o[i] += w * in[i];
            } else {  // per-sequence matrices: the weight changes with the sequence j
              const double* m = mv.mats + b0 * mat_stride + at;
              for (int64_t r = 0; r < R; ++r)
                for (int64_t j = 0; j < n; ++j) o[r * kBlock + j] += m[j * mat_stride] * in[r * kBlock + j];
            }
          }
        }
      }
      belief.swap(next);
    }
    // the block's emission likelihood per parent state, sequence-minor (padding lanes get 0), so
    // the pass over the states below reads it with contiguous vector loads
    for (int64_t j = 0; j < kBlock; ++j) {
      const int64_t b = b0 + j;
      const double* e =
          j < n ? a.emit + ((a.emit_batch == 1 ? 0 : b) * a.vocab + a.tokens[b * a.seq_len + t]) * a.parents : nullptr;
      for (int64_t k = 0; k < a.parents; ++k) like[k * kBlock + j] = e ? e[k] : 0.0;
      p[j] = 0.0;
    }
    for (int64_t z = 0; z < S; ++z) {
      double* bz = belief.data() + z * kBlock;
      const double* lk = like.data() + a.pidx[z] * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) p[j] += (bz[j] *= lk[j]);
    }
    for (int64_t j = 0; j < kBlock; ++j) {
      if (j < n) a.out[(b0 + j) * a.seq_len + t] = -std::log(p[j]);  // p(x_t | x_<t)
      p[j] = j < n ? 1.0 / p[j] : 0.0;
    }
    for (int64_t z = 0; z < S; ++z) {
      double* bz = belief.data() + z * kBlock;
      for (int64_t j = 0; j < kBlock; ++j) bz[j] *= p[j];
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Blocks b, b + stride, ... : the split does not change any sequence's arithmetic.
void forward_worker(const ForwardArgs& a, int64_t first, int64_t stride) {
  std::vector<double> belief(a.states * kBlock), next(a.states * kBlock), like(a.parents * kBlock);
  const int64_t blocks = (a.batch + kBlock - 1) / kBlock;
  for (int64_t blk = first; blk < blocks; blk += stride) {
    const int64_t b0 = blk * kBlock;
    forward_block(a, b0, std::min(kBlock, a.batch - b0), belief, next, like);
  }
}

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

// moves: [(mats float64 (N, d, d), left, d, right, batched)] in topological order; emit (Bk, V, P);
// pidx (S,) int64; tokens (B, T) int64; out (B, T) float64, written with -log p(x_t | x_<t).
void forward(const py::list& spec, Array<double> emit, Array<int64_t> pidx, Array<int64_t> tokens, py::array out,
             int threads) {
  std::vector<Move> moves;
  std::vector<Array<double>> keep;
  const int64_t batch = tokens.shape(0), seq_len = tokens.shape(1), states = pidx.shape(0);
  if (tokens.ndim() != 2 || out.ndim() != 2 || out.shape(0) != batch || out.shape(1) != seq_len)
    throw std::invalid_argument("tokens and out must both be (B, T)");
  if (emit.ndim() != 3 || (emit.shape(0) != 1 && emit.shape(0) != batch))
    throw std::invalid_argument("emit must be (1 or B, V, P)");
  const int64_t vocab = emit.shape(1), parents = emit.shape(2);
  int64_t size = 1;
  for (const py::handle& item : spec) {
    auto tup = item.cast<py::tuple>();
    auto mats = Array<double>::ensure(tup[0]);
    Move mv{nullptr, tup[1].cast<int64_t>(), tup[2].cast<int64_t>(), tup[3].cast<int64_t>(), tup[4].cast<bool>()};
    if (!mats || mats.ndim() != 3 || mats.shape(1) != mv.d || mats.shape(2) != mv.d ||
        mats.shape(0) != (mv.batched ? batch : 1) * mv.left || mv.left * mv.d * mv.right != states)
      throw std::invalid_argument("a move's matrices do not match its (left, d, right)");
    keep.push_back(mats);
    mv.mats = mats.data();
    moves.push_back(mv);
    size *= mv.d;
  }
  if (size != states) throw std::invalid_argument("pidx must have one entry per joint state");
  const int64_t* p = pidx.data();
  for (int64_t z = 0; z < states; ++z)
    if (p[z] < 0 || p[z] >= parents) throw std::invalid_argument("pidx out of range");
  const int64_t* tok = tokens.data();
  for (int64_t i = 0; i < batch * seq_len; ++i)
    if (tok[i] < 0 || tok[i] >= vocab) throw std::invalid_argument("token out of range");
  ForwardArgs args{std::move(moves), emit.data(), emit.shape(0), vocab, parents, p, states, tok, batch, seq_len,
                   output<double>(out, "out")};
  const int64_t blocks = (batch + kBlock - 1) / kBlock;
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  py::gil_scoped_release release;
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < n_threads; ++i) pool.emplace_back(forward_worker, std::cref(args), i, n_threads);
  forward_worker(args, 0, n_threads);
  for (std::thread& th : pool) th.join();
}

}  // namespace

PYBIND11_MODULE(_gssm_sampler, m) {
  m.doc() = "GSSM sampler over numpy buffers (see nanollama/data/gssm.py for the semantics)";
  m.def("sample", &sample, py::arg("nodes"), py::arg("key"), py::arg("states"), py::arg("threads") = 1,
        "Fill states (B, T, n_nodes) int64 with a GSSM sample; deterministic whatever the thread count.");
  m.def("forward", &forward, py::arg("moves"), py::arg("emit"), py::arg("pidx"), py::arg("tokens"), py::arg("out"),
        py::arg("threads") = 1, "Fill out (B, T) with the Bayes-optimal -log p(x_t | x_<t) of tokens (B, T).");
}
