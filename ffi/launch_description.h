// The launch a custom call describes in its attributes (see ffi.py), and
// the checks every stage applies to it before touching a device.
#ifndef JAX_MXFP4_MOE_FFI_LAUNCH_DESCRIPTION_H_
#define JAX_MXFP4_MOE_FFI_LAUNCH_DESCRIPTION_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4_moe {

inline constexpr char kTargetName[] = "jax_mxfp4_moe_launch";

struct LaunchDescription {
  std::string_view code_hash;
  std::string_view kernel;
  xla::ffi::Span<const int64_t> grid;
  xla::ffi::Span<const int64_t> block;
  int64_t shared_mem;
  xla::ffi::Span<const int64_t> arg_kinds;
  xla::ffi::Span<const int64_t> arg_values;
  xla::ffi::Span<const int64_t> arg_offsets;
  int64_t kernarg_size;
  xla::ffi::Span<const int64_t> zero_outputs;
  // Names the launch's workspace (kWorkspace parameter), unique per launch
  // site; 0 when it has none.
  int64_t workspace_id;
};

// Largest workspace one launch may ask for.
inline constexpr int64_t kMaxWorkspaceBytes = int64_t{1} << 30;

// Bytes of the launch's workspace (0: none). ValidateDescription checks that
// there is at most one kWorkspace parameter and a workspace_id to go with it.
int64_t WorkspaceBytes(const LaunchDescription& d);

// Empty if `d` is consistent with `num_args` operands and `num_rets`
// results, else the reason. Kernarg contents are checked by PackKernargs.
std::string ValidateDescription(const LaunchDescription& d, size_t num_args,
                                size_t num_rets);

// An ffi::Error whose message names the target, the kernel and its code
// object, so a failure among many launches says which one failed.
xla::ffi::Error LaunchError(const LaunchDescription& d,
                            xla::ffi::ErrorCode code,
                            const std::string& reason);

}  // namespace jax_mxfp4_moe

// Declares the attributes of a launch on `binding`, in the order of
// LaunchDescription's fields, followed by all operands and results.
#define JAX_MXFP4_MOE_BIND_LAUNCH(binding)                                   \
  binding                                                                    \
      .Attr<std::string_view>("code_hash") /* SHA-256 of the code object */  \
      .Attr<std::string_view>("kernel")    /* kernel symbol */               \
      .Attr<xla::ffi::Span<const int64_t>>("grid")  /* 3 block counts */     \
      .Attr<xla::ffi::Span<const int64_t>>("block") /* 3 thread counts */    \
      .Attr<int64_t>("shared_mem")         /* dynamic shared bytes */        \
      .Attr<xla::ffi::Span<const int64_t>>("arg_kinds")  /* ArgKind each */  \
      .Attr<xla::ffi::Span<const int64_t>>("arg_values") /* index or bits */ \
      .Attr<xla::ffi::Span<const int64_t>>("arg_offsets") /* byte offset */  \
      .Attr<int64_t>("kernarg_size")       /* kernarg buffer bytes */        \
      .Attr<xla::ffi::Span<const int64_t>>("zero_outputs") /* memset 0 */    \
      .Attr<int64_t>("workspace_id")       /* 0, or the workspace's key */   \
      .RemainingArgs()                     /* operand buffers */             \
      .RemainingRets()                     /* result buffers */

#endif  // JAX_MXFP4_MOE_FFI_LAUNCH_DESCRIPTION_H_
