// The one schema block: every dcx op is declared here. Implementations register themselves at
// the bottom of their backend files (csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cpp) with
// TORCH_LIBRARY_IMPL, so the dispatcher, not an #ifdef, picks the kernel for a device.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dcx, m) {
  // One fused SGD step; pruned positions (mask == 0) of param and momentum_buffer become exactly
  // zero. init_buffer: the buffer is new and takes the gradient, as torch.optim.SGD's first step.
  m.def(
      "masked_sgd_step_(Tensor(a!) param, Tensor grad, Tensor mask, Tensor(b!)? momentum_buffer, "
      "float lr, float momentum=0., float dampening=0., float weight_decay=0., "
      "bool nesterov=False, bool maximize=False, bool init_buffer=False) -> ()");
  // Per-cluster sum of grad over the positions with that label (mask == 0 excluded).
  m.def("centroid_grad(Tensor grad, Tensor labels, int num_clusters, Tensor? mask=None) -> Tensor");
  // y = x W^T + bias with W [out_features, in_features] held packed (codebook ids decoded on the
  // fly; layout at the top of csrc/cpu/spqmm_cpu.cpp, built by dcx.nn.pack). x: [..., K];
  // y: [..., N]. crossover: the batch from which W is decoded once and the BLAS runs (-1: auto).
  // check=False: on CUDA, do not read back the corruption flag (no host sync; reads stay in bounds).
  m.def(
      "spqmm(Tensor x, Tensor codes, Tensor seg_ptr, Tensor chunks, Tensor codebook, "
      "int out_features, int in_features, int bits, Tensor? bias=None, int crossover=-1, "
      "bool check=True) -> Tensor");
}

// `import dcx._C` loads this library, which runs the registrations above; the module itself is
// empty: everything is reached through torch.ops.dcx.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
