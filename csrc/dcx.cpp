// The one schema block: every dcx op is declared here. Implementations register themselves at
// the bottom of their backend files (csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cpp) with
// TORCH_LIBRARY_IMPL, so the dispatcher, not an #ifdef, picks the kernel for a device.
#include <Python.h>
#include <torch/library.h>

#include "core/spqmm_layout.h"
#include "core/spqmm_plan.h"

TORCH_LIBRARY(dcx, m) {
  // One fused SGD step; pruned positions (mask == 0) of param and momentum_buffer become exactly
  // zero. init_buffer: the buffer is new and takes the gradient, as torch.optim.SGD's first step.
  m.def(
      "masked_sgd_step_(Tensor(a!) param, Tensor grad, Tensor mask, Tensor(b!)? momentum_buffer, "
      "float lr, float momentum=0., float dampening=0., float weight_decay=0., "
      "bool nesterov=False, bool maximize=False, bool init_buffer=False) -> ()");
  // One fused AdamW step (torch.optim.AdamW's arithmetic in float32); pruned positions of param
  // and of every moment buffer become exactly zero. step: the step number, from 1.
  m.def(
      "masked_adamw_step_(Tensor(a!) param, Tensor grad, Tensor mask, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!)? max_exp_avg_sq, int step, float lr, float beta1=0.9, "
      "float beta2=0.999, float eps=1e-8, float weight_decay=0.01, bool amsgrad=False, "
      "bool maximize=False) -> ()");
  // Per-cluster sum of grad over the positions with that label (mask == 0 excluded). Labels
  // outside [0, num_clusters) are never written; check=True makes them an error (on CUDA one
  // host sync, which a training loop over labels it made itself skips with check=False).
  m.def(
      "centroid_grad(Tensor grad, Tensor labels, int num_clusters, Tensor? mask=None, "
      "bool check=True) -> Tensor");
  // Canonical Huffman codec of the .dcx file (csrc/core/huffman.h). CPU only: it is a file-format
  // step run by dcx.save / dcx.load, not a kernel on the model's path. A code is given by its
  // code lengths (uint8, one per symbol of the alphabet, 0 = absent).
  // Optimal lengths of at most max_length bits for int64 symbol counts [n] -> uint8 [n].
  m.def("huffman_code_lengths(Tensor freqs, int max_length=24) -> Tensor");
  // uint8/uint16/int16/int32/int64 symbols (any shape, read flat) -> uint8 bitstream, MSB first.
  m.def("huffman_encode(Tensor symbols, Tensor code_lengths) -> Tensor");
  // Exactly `count` symbols -> uint8 [count] (alphabet <= 256) or uint16 [count]; a corrupt
  // stream is an error, never a read past `data` or a write past `count`.
  m.def("huffman_decode(Tensor data, Tensor code_lengths, int count) -> Tensor");
  // 1-D k-means of all values: centroids [num_clusters] ascending (values' dtype), labels int32 of
  // values' shape. init: linear | density | random | kmeans++; method: lloyd | optimal.
  // weights: one per value (values' shape and dtype, > 0): minimise sum weights (values - c)^2.
  m.def(
      "kmeans1d(Tensor values, int num_clusters, str init=\"linear\", int max_iter=300, "
      "float tol=1e-4, int seed=0, str method=\"lloyd\", Tensor? weights=None) -> (Tensor, Tensor)");
  // y = x W^T + bias with W [out_features, in_features] held packed (codebook ids decoded on the
  // fly; layout at the top of csrc/core/spqmm.h, built by dcx.packing.pack). x: [..., K];
  // y: [..., N]. crossover: the batch from which W is decoded once and the BLAS runs (-1: auto).
  // check=False: on CUDA, do not read back the corruption flag (no host sync; reads stay in bounds).
  // compute: auto | float32 | bfloat16 | int8 (op_args.h); the kernel from csrc/core/spqmm_plan.h.
  // scale: a scaled codebook's [out_features] row scales (W = scale[row] * codebook[id]), or with
  // group_size > 0 (a multiple of 32) its [out_features, ceil(in_features / group_size)] group
  // scales (W[r][j] = scale[r][j / group_size] * codebook[id]).
  m.def(
      "spqmm(Tensor x, Tensor codes, Tensor windows, Tensor group_ptr, Tensor chunks, Tensor codebook, "
      "int out_features, int in_features, int bits, Tensor? bias=None, int crossover=-1, "
      "bool check=True, str compute=\"auto\", Tensor? scale=None, int group_size=0) -> Tensor");
  // W [out_features, in_features] of a packed weight, decoded in the codebook's dtype (0 where
  // pruned): the backward of spqmm and spqmm_int8 (grad_x = grad_y W), unpacking, and a packed
  // embedding's lookup. check=False: as spqmm's (no host sync on CUDA; reads stay in bounds).
  m.def(
      "spqmm_decode(Tensor codes, Tensor windows, Tensor group_ptr, Tensor chunks, "
      "Tensor codebook, int out_features, int in_features, int bits, bool check=True) -> Tensor");
  // The same product for a dense-mode layer in int8 arithmetic (csrc/core/spqmm_int8.h): the
  // codebook as int16 with one scale, x quantized to int8 per row in blocks of 32, int32 dot
  // products.
  m.def(
      "spqmm_int8(Tensor x, Tensor codes, Tensor codebook, int out_features, int in_features, "
      "int bits, Tensor? bias=None, bool check=True, Tensor? scale=None, int group_size=0) -> Tensor");
}

// `import dcx._C` loads this library, which runs the registrations above; the ops are reached
// through torch.ops.dcx. The module holds two things read from where the kernels read them, so that
// Python keeps no copies: SPQMM_LAYOUT, the packed layout's constants (csrc/core/spqmm_layout.h,
// for the packer dcx.packing.pack), and SPQMM_PLAN, the kernel table (csrc/core/spqmm_plan.h,
// for the tests that run every entry and for the benchmarks' labels).
namespace {

PyObject* plan_table() {
  static const char* const isas[] = {"portable", "avx2", "avx512", "cuda", "avx512vnni",
                                     "avx512amx"};
  static const char* const modes[] = {"sparse", "dense", "int8", "bfloat16", "sparse_bfloat16",
                                      "sparse_int8"};
  static const char* const kernels[] = {"sparse_steps", "sparse_batch", "dense_rows",
                                        "dense_many", "int8_rows", "decode_gemm",
                                        "int8_many", "int8_fused", "bf16_amx", "sparse_amx",
                                        "int8_gemm", "sparse_batch_bf16", "int8_dots",
                                        "sparse_int8"};
  PyObject* list = PyList_New(dcx::kSpqmmPlanSize);
  if (list == nullptr) return nullptr;
  for (int i = 0; i < dcx::kSpqmmPlanSize; ++i) {
    const dcx::SpqmmRule& r = dcx::kSpqmmPlan[i];
    const long long below = r.rows_below == dcx::kSpqmmNoBound ? -1 : r.rows_below;
    PyObject* entry = Py_BuildValue(
        "{s:s,s:s,s:L,s:d,s:s,s:i,s:L,s:L,s:i}", "isa", isas[int(r.isa)], "mode",
        modes[int(r.mode)], "rows_below", below, "max_density", r.max_density, "kernel",
        kernels[int(r.kernel)], "block", r.block, "min_weights",
        static_cast<long long>(r.min_weights), "min_rows", static_cast<long long>(r.min_rows),
        "min_bits", r.min_bits);
    if (entry == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, entry);
  }
  return list;
}

// plan_rule(isa, mode, bits, density, n, k, rows): the index in SPQMM_PLAN of the rule spqmm takes
// (-1: none), as the op decides it (isa and mode as indices into the names above).
PyObject* plan_rule(PyObject*, PyObject* args) {
  int isa = 0, mode = 0, bits = 0;
  double density = 1.0;
  long long n = 0, k = 0, rows = 0;
  if (!PyArg_ParseTuple(args, "iiidLLL", &isa, &mode, &bits, &density, &n, &k, &rows)) return nullptr;
  if (isa < 0 || isa > 5 || mode < 0 || mode > 5) {
    PyErr_SetString(PyExc_ValueError, "isa must lie in [0, 5] and mode in [0, 5]");
    return nullptr;
  }
  const dcx::SpqmmPlan plan = dcx::spqmm_plan(dcx::SpqmmIsa(isa), dcx::SpqmmMode(mode), bits, density,
                                              n, k, rows, 1);
  return PyLong_FromLong(plan.rule);
}

PyMethodDef methods[] = {
    {"spqmm_plan_rule", plan_rule, METH_VARARGS, "the SPQMM_PLAN rule for a call"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* layout = Py_BuildValue(
      "{s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "rows", dcx::kSpqmmRows, "window", dcx::kSpqmmWindow,
      "live_bit", dcx::kSpqmmLiveBit, "offset_shift", dcx::kSpqmmOffsetShift, "id_mask",
      dcx::kSpqmmIdMask, "nibble_block", dcx::kSpqmmNibbleBlock, "bit_block",
      dcx::kSpqmmBitBlock);
  if (layout == nullptr || PyModule_AddObject(module, "SPQMM_LAYOUT", layout) < 0) {
    Py_XDECREF(layout);
    Py_DECREF(module);
    return nullptr;
  }
  PyObject* plan = plan_table();
  if (plan == nullptr || PyModule_AddObject(module, "SPQMM_PLAN", plan) < 0) {
    Py_XDECREF(plan);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
