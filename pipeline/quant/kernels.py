"""The inference quantize pass as one fused CPU loop (C++, compiled on first use), bit-exact with the eager one.

The eager pass over an activation, x / s, round half to even, clamp, then * s (fake quant) or + z and a uint8 cast
(the int8 kernels' input), is four or five passes over memory in fp32. In the deployed bf16 runtime it gave back
about half of what the int8 kernels save over bf16 GEMMs (docs/deploy.md). Here it is one pass: read x (fp32 or
bf16), write the result in x's dtype or as uint8. Same arithmetic, element by element: x cast up exactly, an IEEE
fp32 division by fp32(s), rint (half to even), clamp to [lo, hi], then * fp32(s) rounded to x's dtype (bf16: to
nearest even), or + z. `tests/test_kernels.py` checks it against the eager pass on every bf16 value and on fp32
ties.

It is an accelerator, not a dependency. What it does not cover (other dtypes or devices, autograd, a strided
view to fake-quantize) returns None and the caller runs the eager pass (uint8 codes of a strided view come from
its dense copy); so does a machine where it cannot be built (no C++ compiler or ninja: one warning says why).
QLIP_FUSED_KERNELS=0 turns it off (read per call: A/B timing). torch caches the build (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions): about 30 s once per machine. One binary serves every x86 CPU: GCC's
target_clones picks the AVX-512, AVX2 or baseline loop at load time."""
from __future__ import annotations

import functools
import logging
import os
import warnings

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>

static inline float load(float v) { return v; }
static inline float load(uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline void store(float v, float* o) { *o = v; }
static inline void store(float v, uint16_t* o) {  // fp32 -> bf16, round to nearest even (c10::BFloat16's rule)
  uint32_t u; std::memcpy(&u, &v, 4);
  *o = v != v ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float grid(float x, float s, float lo, float hi) {
  float q = __builtin_rintf(x / s);  // the default rounding mode: half to even, as torch.round
  q = q < lo ? lo : q;  // NaN passes through both, as in torch.clamp
  return q > hi ? hi : q;
}

#if defined(__x86_64__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

CLONES static void codes_f32(const float* x, uint8_t* o, int64_t n, float s, float lo, float hi, float z) {
  for (int64_t i = 0; i < n; ++i) o[i] = uint8_t(int32_t(grid(load(x[i]), s, lo, hi) + z));
}
CLONES static void codes_bf16(const uint16_t* x, uint8_t* o, int64_t n, float s, float lo, float hi, float z) {
  for (int64_t i = 0; i < n; ++i) o[i] = uint8_t(int32_t(grid(load(x[i]), s, lo, hi) + z));
}
CLONES static void fake_f32(const float* x, float* o, int64_t n, float s, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) store(grid(load(x[i]), s, lo, hi) * s, o + i);
}
CLONES static void fake_bf16(const uint16_t* x, uint16_t* o, int64_t n, float s, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) store(grid(load(x[i]), s, lo, hi) * s, o + i);
}

static bool covered(const torch::Tensor& x) {
  return x.device().is_cpu() && x.is_non_overlapping_and_dense() &&
         !(x.requires_grad() && at::GradMode::is_enabled()) &&
         (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16);
}
static constexpr int64_t GRAIN = 1 << 15;

// uint8 codes clamp(rint(x / s), lo, hi) - lo, laid out as x; undefined (None) where not covered
torch::Tensor uint8_codes(torch::Tensor x, double s, double lo, double hi) {
  if (!covered(x)) return torch::Tensor();
  auto o = torch::empty_like(x, x.options().dtype(torch::kUInt8));
  const float sf = float(s), l = float(lo), h = float(hi), z = -float(lo);
  uint8_t* out = o.data_ptr<uint8_t>();
  const bool bf = x.scalar_type() == torch::kBFloat16;
  const void* in = x.data_ptr();
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t b, int64_t e) {
    if (bf) codes_bf16(static_cast<const uint16_t*>(in) + b, out + b, e - b, sf, l, h, z);
    else codes_f32(static_cast<const float*>(in) + b, out + b, e - b, sf, l, h, z);
  });
  return o;
}

// clamp(rint(x / s), lo, hi) * s in x's dtype, into x itself when inplace; undefined (None) where not covered
torch::Tensor fake_quantize(torch::Tensor x, double s, double lo, double hi, bool inplace) {
  if (!covered(x)) return torch::Tensor();
  auto o = inplace ? x : torch::empty_like(x);
  const float sf = float(s), l = float(lo), h = float(hi);
  const bool bf = x.scalar_type() == torch::kBFloat16;
  const void* in = x.data_ptr();
  void* out = o.data_ptr();
  at::parallel_for(0, x.numel(), GRAIN, [&](int64_t b, int64_t e) {
    if (bf) fake_bf16(static_cast<const uint16_t*>(in) + b, static_cast<uint16_t*>(out) + b, e - b, sf, l, h);
    else fake_f32(static_cast<const float*>(in) + b, static_cast<float*>(out) + b, e - b, sf, l, h);
  });
  return o;
}
"""


def _turned_off() -> bool:  # read per call, so a benchmark can time both in one process
    return os.environ.get("QLIP_FUSED_KERNELS", "1") == "0"


def _module():
    """The compiled extension, or None: turned off, or it cannot be built here."""
    return None if _turned_off() else _built()


@functools.cache
def _built():
    """Build (or load the cached build of) the extension once per process; None, warned once, where it fails."""
    try:
        torch_log = logging.getLogger("torch.utils.cpp_extension")
        level = torch_log.level
        torch_log.setLevel(logging.ERROR)  # its import warns of CUDA_HOME on a CPU-only torch
        try:
            from torch.utils.cpp_extension import load_inline
        finally:
            torch_log.setLevel(level)
        log.info("loading the fused quantize kernel (built once per machine, about 30 s)")
        # -fno-trapping-math lets GCC vectorize rint; it changes no result (no code here reads FP exceptions)
        return load_inline("qlip_fused_quantize", cpp_sources=[_SOURCE], functions=["uint8_codes", "fake_quantize"],
                           extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a read-only cache: the eager pass is correct, only slower
        warnings.warn(f"the fused quantize kernel could not be built ({type(e).__name__}: {str(e)[:300]}); "
                      f"quantizing with the eager pass (correct, slower). Install a C++ compiler and ninja "
                      f"(pip install ninja), or set QLIP_FUSED_KERNELS=0 to silence this", stacklevel=2)
        return None


def unavailable() -> str | None:
    """Why the fused kernel is not in use here, or None."""
    if _turned_off():
        return "turned off (QLIP_FUSED_KERNELS=0)"
    return None if _built() is not None else "it could not be built (see the warning)"


def _covered(x: torch.Tensor) -> bool:  # the cheap checks first: no build is attempted for a call it cannot take
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not (
        x.requires_grad and torch.is_grad_enabled())


def uint8_codes(x: torch.Tensor, scale: float, lo: float, hi: float) -> torch.Tensor | None:
    """clamp(round(x / scale), lo, hi) - lo as uint8, laid out as `x` (a strided view: as its dense copy); None
    where the eager pass must run."""
    m = _module() if _covered(x) else None
    if m is None:
        return None
    codes = m.uint8_codes(x, scale, lo, hi)
    if codes is None:  # a strided view (a channel slice of a split layer's input): one copy beats the eager pass
        channels_last = x.dim() == 4 and x.stride(1) == 1
        codes = m.uint8_codes(x.contiguous(memory_format=torch.channels_last if channels_last else
                                           torch.contiguous_format), scale, lo, hi)
    return codes


def fake_quantize(x: torch.Tensor, scale: float, lo: float, hi: float, inplace: bool = False) -> torch.Tensor | None:
    """clamp(round(x / scale), lo, hi) * scale in x's dtype (into `x` when `inplace`); None where the eager pass
    must run."""
    m = _module() if _covered(x) else None
    return None if m is None else m.fake_quantize(x, scale, lo, hi, inplace)
