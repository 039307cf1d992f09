// Kernel-argument buffer packing: the launch description (one kind, value and
// byte offset per kernel parameter) becomes the raw kernarg bytes handed to
// the driver with the "extra" buffer-pointer launch form. Pure host code,
// shared by the FFI handler and the nanobind test hook.
#ifndef JAX_MXFP4_MOE_FFI_KERNARGS_H_
#define JAX_MXFP4_MOE_FFI_KERNARGS_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_mxfp4_moe {

// Parameter kinds; the numbers are part of the Python <-> C++ contract
// (jax_mxfp4_moe/ffi.py `_KIND_CODES`).
enum class ArgKind : int64_t {
  kBuffer = 0,  // value: buffer index (operands first, then results)
  kI32 = 1,     // value: signed 32-bit integer
  kU32 = 2,     // value: unsigned 32-bit integer
  kI64 = 3,     // value: signed 64-bit integer
  kF32 = 4,     // value: the 32 bits of an IEEE float
  kNull = 5,    // a NULL pointer (8 bytes); value ignored
  kAlignedBuffer = 6,  // as kBuffer, and the address must be 16-byte aligned
                       // (the kernel was compiled assuming it: vector loads)
  kWorkspace = 7,  // value: bytes; the launch's workspace (launcher.h), a
                   // pointer to device memory the kernel leaves all zero
};

// Alignment promised by kAlignedBuffer parameters.
inline constexpr uint64_t kBufferAlignment = 16;

// Largest kernarg buffer accepted (the classic CUDA parameter limit).
inline constexpr int64_t kMaxKernargSize = 4096;

// Checks the launch description and writes the packed arguments into
// `out[0, size)` (zero-filled between parameters). `buffers[i]` is the device
// address of buffer i; `workspace` the address kWorkspace parameters get.
// Returns an empty string on success, else a readable reason (nothing is
// promised about `out` then).
std::string PackKernargs(const int64_t* kinds, const int64_t* values,
                         const int64_t* offsets, size_t num_params,
                         int64_t size, const uint64_t* buffers,
                         size_t num_buffers, uint64_t workspace, uint8_t* out);

}  // namespace jax_mxfp4_moe

#endif  // JAX_MXFP4_MOE_FFI_KERNARGS_H_
