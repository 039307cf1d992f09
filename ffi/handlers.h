// XLA FFI handler symbols of the launch target (see launcher.h) for each
// platform, and a CPU dry run of the same launch description.
#ifndef JAX_MXFP4_MOE_FFI_HANDLERS_H_
#define JAX_MXFP4_MOE_FFI_HANDLERS_H_

#include <cstdint>

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MoeLaunchCudaInitialize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MoeLaunchCudaExecute);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MoeLaunchRocmInitialize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MoeLaunchRocmExecute);

// CPU target: validates and packs a launch description exactly as the GPU
// handlers do, writes the kernarg bytes into its LAST result (u8 of
// kernarg_size), zero-fills `zero_outputs`, and launches nothing. It lets the
// attribute decoding and packing be tested without a GPU. A workspace
// parameter packs as kDryRunWorkspace (no device memory is allocated).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMxfp4MoeLaunchDryRun);

namespace jax_mxfp4_moe {
inline constexpr uint64_t kDryRunWorkspace = 0x5753000000000000;  // "WS"
}  // namespace jax_mxfp4_moe

#endif  // JAX_MXFP4_MOE_FFI_HANDLERS_H_
