#include "handlers.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "kernargs.h"
#include "launch_description.h"
#include "launcher.h"
#include "vendor.h"

namespace ffi = xla::ffi;

namespace jax_mxfp4_moe {
namespace {

using I64s = ffi::Span<const int64_t>;

LaunchDescription Describe(std::string_view code_hash, std::string_view kernel,
                           I64s grid, I64s block, int64_t shared_mem,
                           I64s arg_kinds, I64s arg_values, I64s arg_offsets,
                           int64_t kernarg_size, I64s zero_outputs,
                           int64_t workspace_id) {
  return LaunchDescription{code_hash,  kernel,      grid,         block,
                           shared_mem, arg_kinds,   arg_values,   arg_offsets,
                           kernarg_size, zero_outputs, workspace_id};
}

template <typename V>
ffi::Error Initialize(void* stream, std::string_view code_hash,
                      std::string_view kernel, I64s grid, I64s block,
                      int64_t shared_mem, I64s arg_kinds, I64s arg_values,
                      I64s arg_offsets, int64_t kernarg_size,
                      I64s zero_outputs, int64_t workspace_id,
                      ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return InitializeLaunch<V>(
      stream,
      Describe(code_hash, kernel, grid, block, shared_mem, arg_kinds,
               arg_values, arg_offsets, kernarg_size, zero_outputs,
               workspace_id),
      args.size(), rets.size());
}

template <typename V>
ffi::Error Execute(void* stream, std::string_view code_hash,
                   std::string_view kernel, I64s grid, I64s block,
                   int64_t shared_mem, I64s arg_kinds, I64s arg_values,
                   I64s arg_offsets, int64_t kernarg_size, I64s zero_outputs,
                   int64_t workspace_id, ffi::RemainingArgs args,
                   ffi::RemainingRets rets) {
  return ExecuteLaunch<V>(
      stream,
      Describe(code_hash, kernel, grid, block, shared_mem, arg_kinds,
               arg_values, arg_offsets, kernarg_size, zero_outputs,
               workspace_id),
      args, rets);
}

ffi::Error DryRun(std::string_view code_hash, std::string_view kernel,
                  I64s grid, I64s block, int64_t shared_mem, I64s arg_kinds,
                  I64s arg_values, I64s arg_offsets, int64_t kernarg_size,
                  I64s zero_outputs, int64_t workspace_id,
                  ffi::RemainingArgs args, ffi::RemainingRets rets) {
  LaunchDescription d =
      Describe(code_hash, kernel, grid, block, shared_mem, arg_kinds,
               arg_values, arg_offsets, kernarg_size, zero_outputs,
               workspace_id);
  if (rets.size() == 0) {
    return LaunchError(d, ffi::ErrorCode::kInvalidArgument,
                       "the dry run needs a last result for the kernargs");
  }
  if (std::string why = ValidateDescription(d, args.size(), rets.size() - 1);
      !why.empty()) {
    return LaunchError(d, ffi::ErrorCode::kInvalidArgument, why);
  }
  size_t num_buffers = args.size() + rets.size() - 1;
  if (num_buffers > kMaxBuffers) {
    return LaunchError(d, ffi::ErrorCode::kInvalidArgument,
                       "too many buffers");
  }
  uint64_t addresses[kMaxBuffers];
  for (size_t i = 0; i < args.size(); ++i) {
    auto buffer = args.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) {
      return LaunchError(d, ffi::ErrorCode::kInvalidArgument,
                         "operand " + std::to_string(i) + " is not a buffer");
    }
    addresses[i] = reinterpret_cast<uint64_t>(buffer->untyped_data());
  }
  for (size_t i = 0; i + 1 < rets.size(); ++i) {
    auto buffer = rets.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) {
      return LaunchError(d, ffi::ErrorCode::kInvalidArgument,
                         "result " + std::to_string(i) + " is not a buffer");
    }
    addresses[args.size() + i] =
        reinterpret_cast<uint64_t>((*buffer)->untyped_data());
  }
  auto out = rets.get<ffi::AnyBuffer>(rets.size() - 1);
  if (!out.has_value() ||
      static_cast<int64_t>((*out)->size_bytes()) != d.kernarg_size) {
    return LaunchError(d, ffi::ErrorCode::kInvalidArgument,
                       "the dry run's last result must hold kernarg_size "
                       "bytes");
  }
  // No device memory here: a workspace parameter packs as kDryRunWorkspace.
  alignas(16) uint8_t kernargs[kMaxKernargSize];
  std::string error = PackKernargs(
      d.arg_kinds.begin(), d.arg_values.begin(), d.arg_offsets.begin(),
      d.arg_kinds.size(), d.kernarg_size, addresses, num_buffers,
      kDryRunWorkspace, kernargs);
  if (!error.empty()) {
    return LaunchError(d, ffi::ErrorCode::kInvalidArgument, error);
  }
  std::memcpy((*out)->untyped_data(), kernargs,
              static_cast<size_t>(d.kernarg_size));
  for (int64_t r : d.zero_outputs) {
    auto buffer = rets.get<ffi::AnyBuffer>(r);
    std::memset((*buffer)->untyped_data(), 0, (*buffer)->size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_mxfp4_moe

using jax_mxfp4_moe::CudaVendor;
using jax_mxfp4_moe::HipVendor;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMxfp4MoeLaunchCudaInitialize, jax_mxfp4_moe::Initialize<CudaVendor>,
    JAX_MXFP4_MOE_BIND_LAUNCH(
        ffi::Ffi::Bind<ffi::ExecutionStage::kInitialize>()
            .Ctx<ffi::PlatformStream<void*>>()),  // XLA's stream
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMxfp4MoeLaunchCudaExecute, jax_mxfp4_moe::Execute<CudaVendor>,
    JAX_MXFP4_MOE_BIND_LAUNCH(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()),  // XLA's stream
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMxfp4MoeLaunchRocmInitialize, jax_mxfp4_moe::Initialize<HipVendor>,
    JAX_MXFP4_MOE_BIND_LAUNCH(
        ffi::Ffi::Bind<ffi::ExecutionStage::kInitialize>()
            .Ctx<ffi::PlatformStream<void*>>()),  // XLA's stream
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxMxfp4MoeLaunchRocmExecute, jax_mxfp4_moe::Execute<HipVendor>,
    JAX_MXFP4_MOE_BIND_LAUNCH(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>()),  // XLA's stream
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMxfp4MoeLaunchDryRun,
                              jax_mxfp4_moe::DryRun,
                              JAX_MXFP4_MOE_BIND_LAUNCH(ffi::Ffi::Bind()));
