// Schemas of every op in the `fg` namespace, and the Python module stub.
//
// The schemas live here, in one place, so that every backend (the CPU kernels in csrc/cpu, the
// Triton kernels registered from Python for CUDA) implements exactly the same contract. Autograd
// of fg::gated_linear is registered once, in C++ (autograd.cpp); the fake (meta) kernels in Python
// (fg_kernels/registration.py).

#include <torch/library.h>

#ifndef FG_NO_PYTHON_MODULE
#include <Python.h>

extern "C" {
// `import fg_kernels._C` only needs to load this shared library so that the static
// TORCH_LIBRARY initialisers below run; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "FineGates kernels: loads the fg operator library.", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif  // FG_NO_PYTHON_MODULE (the CMake/libtorch build has no Python module)

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(fg, m) {
  // y = row_gate * ((x * col_gate) @ (weight + lora_scale * lora_b @ lora_a).T + bias),
  // computed for active rows/columns only; inactive outputs are exactly 0.
  m.def(
      "gated_linear(Tensor x, Tensor weight, Tensor? bias, Tensor row_gate, Tensor col_gate, "
      "Tensor? lora_a=None, Tensor? lora_b=None, float lora_scale=1.0) -> Tensor");
  // Backward of gated_linear. `output` is the forward result (needed only for row_gate's
  // gradient); `x` may be None when neither col_gate, weight nor LoRA needs a gradient.
  // output_mask selects (x, weight, bias, row_gate, col_gate, lora_a, lora_b); an unselected
  // gradient is returned as an empty tensor of shape (0,).
  m.def(
      "gated_linear_backward(Tensor grad_out, Tensor? x, Tensor weight, Tensor row_gate, "
      "Tensor col_gate, Tensor? lora_a, Tensor? lora_b, float lora_scale, Tensor? output, "
      "bool[7] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Inference on a compacted layer: y[..., row_idx] = x[..., col_idx] @ weight_c.T + bias_c.
  m.def(
      "gathered_linear(Tensor x, Tensor weight_c, Tensor? bias_c, Tensor? row_idx, "
      "Tensor? col_idx, int out_features) -> Tensor");
  // Bytes held by the CPU kernels' cache of gate-folded weight blocks; `clear` empties it first.
  // No tensor argument, so one implementation for every dispatch key.
  m.def("cpu_weight_cache(bool clear=False) -> int", &fg::cpu::cpu_weight_cache);
  // Opens (delta 1) or closes (delta -1) a frozen_weights() scope; returns how many are open.
  m.def("cpu_weight_reuse(int delta) -> int", &fg::cpu::cpu_weight_reuse);
}
