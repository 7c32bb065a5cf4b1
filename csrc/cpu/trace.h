// Named ranges of the CPU kernels' phases in torch.profiler traces (gathers, the GEMM, the
// epilogue, the backward's passes), so a profile shows where an op's time goes. Off the profiler a
// range costs one flag check.
#pragma once

#include <ATen/record_function.h>

#define FG_TRACE(name) RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{})
