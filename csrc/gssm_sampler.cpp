// Fast GSSM sampler: the same draws as the numpy reference in nanollama/data/gssm.py, bit for bit.
//
// Randomness is counter-based (SplitMix64's finaliser over a per-sequence key and a per-draw
// counter), so each sequence is sampled independently of the others: the batch is split across
// threads and the result does not depend on how many there are. Kernel tables arrive as float64
// numpy buffers prepared in Python; only pybind11's numpy API is used (no torch ABI).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
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
void sample(const py::list& spec, uint64_t key, py::array_t<int64_t, py::array::c_style> states, int threads) {
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
  int64_t* out = states.mutable_data();
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

}  // namespace

PYBIND11_MODULE(_gssm_sampler, m) {
  m.doc() = "GSSM sampler over numpy buffers (see nanollama/data/gssm.py for the semantics)";
  m.def("sample", &sample, py::arg("nodes"), py::arg("key"), py::arg("states"), py::arg("threads") = 1,
        "Fill states (B, T, n_nodes) int64 with a GSSM sample; deterministic whatever the thread count.");
}
