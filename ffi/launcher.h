// The launch handler, one body for both vendors (V = CudaVendor or
// HipVendor, vendor.h).
//
// Initialize stage: resolve the code object by hash, load it once per
// (device, hash), look the kernel up, and cache the function; allocate the
// launch's workspace on first use. Execute stage: look the function (and
// workspace) up (shared lock), pack the kernargs, memset the requested
// results, launch on XLA's stream. Execute does no loading, allocation or
// synchronisation, so XLA may capture it into a command buffer (CUDA graph).
// XLA runs the initialize stage before every execution, so its cached path
// is one shared-lock lookup.
//
// A workspace is device memory that outlives the launch: zeroed once when
// allocated, and left all zero by every run of the kernel (its contract), so
// a kernel that needs zeroed counters or sums gets them without a memset on
// the stream before each launch. One per (device, workspace_id, bytes): the
// id is numbered per launch site when the call is traced (ffi.py), so the
// launches of one executable never share one, even where a command buffer
// runs them concurrently; a launch site does not run twice at once on a
// device. Launches of different executables that happen to carry the same
// id share it, in stream order, which the all-zero contract makes safe.
// Kept for the life of the process, like loaded code objects.
#ifndef JAX_MXFP4_MOE_FFI_LAUNCHER_H_
#define JAX_MXFP4_MOE_FFI_LAUNCHER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <tuple>

#include "code_store.h"
#include "kernargs.h"
#include "launch_description.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4_moe {

// Most buffers (operands + results) one launch may pass.
inline constexpr size_t kMaxBuffers = 256;

template <typename V>
class ModuleCache {
 public:
  struct Function {
    void* handle;
    int64_t shared_limit;  // dynamic shared memory the function may use
  };

  static ModuleCache& Get() {
    static auto* cache = new ModuleCache();  // never destroyed: used at exit
    return *cache;
  }

  // Copies the cached function into `out`; false if there is none.
  bool Find(uintptr_t device, std::string_view hash, std::string_view kernel,
            Function* out) {
    std::shared_lock<std::shared_mutex> lock(mu_);
    auto it = functions_.find(std::make_tuple(device, hash, kernel));
    if (it == functions_.end()) return false;
    *out = it->second;
    return true;
  }

  // Loads what is missing so that `kernel` of `hash` runs on `device` with
  // `shared_mem` dynamic bytes; empty string on success, else the reason.
  std::string Ensure(const typename V::Api* api, uintptr_t device,
                     std::string_view hash, std::string_view kernel,
                     int64_t shared_mem, xla::ffi::ErrorCode* code) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto fit = functions_.find(std::make_tuple(device, hash, kernel));
    if (fit != functions_.end() && fit->second.shared_limit >= shared_mem) {
      return {};
    }
    typename V::ScopedDevice scoped(api, device);
    if (fit == functions_.end()) {
      auto mit = modules_.find(std::make_tuple(device, hash));
      if (mit == modules_.end()) {
        std::string error;
        std::shared_ptr<const std::string> bytes = FindCodeObject(hash, &error);
        if (!bytes) {
          *code = xla::ffi::ErrorCode::kNotFound;
          return error;
        }
        void* module = nullptr;
        if (int s = api->ModuleLoadData(&module, bytes->data())) {
          *code = xla::ffi::ErrorCode::kInternal;
          return "loading the code object failed: " + V::ErrorString(api, s);
        }
        mit = modules_.emplace(std::make_tuple(device, std::string(hash)),
                               module).first;
      }
      void* function = nullptr;
      std::string name(kernel);
      if (int s = api->ModuleGetFunction(&function, mit->second,
                                         name.c_str())) {
        *code = xla::ffi::ErrorCode::kNotFound;
        return "the code object has no kernel of that name: " +
               V::ErrorString(api, s);
      }
      fit = functions_.emplace(
          std::make_tuple(device, std::string(hash), name),
          Function{function, 0}).first;
    }
    if (int s = V::SetSharedMemory(api, fit->second.handle, shared_mem)) {
      *code = xla::ffi::ErrorCode::kInvalidArgument;
      return "setting " + std::to_string(shared_mem) +
             " bytes of dynamic shared memory failed: " +
             V::ErrorString(api, s);
    }
    fit->second.shared_limit = shared_mem;
    return {};
  }

 private:
  std::shared_mutex mu_;
  // Loaded modules are never unloaded: functions handed out stay valid.
  std::map<std::tuple<uintptr_t, std::string>, void*, std::less<>> modules_;
  std::map<std::tuple<uintptr_t, std::string, std::string>, Function,
           std::less<>>
      functions_;
};

class WorkspaceCache {
 public:
  static WorkspaceCache& Get() {
    static auto* cache = new WorkspaceCache();  // never destroyed: used at exit
    return *cache;
  }

  // The workspace's address, 0 if it was not allocated yet.
  uint64_t Find(uintptr_t device, int64_t id, int64_t bytes) {
    std::shared_lock<std::shared_mutex> lock(mu_);
    auto it = workspaces_.find(std::make_tuple(device, id, bytes));
    return it == workspaces_.end() ? 0 : it->second;
  }

  // Allocates (zeroed) what is missing; empty string on success, else why.
  template <typename V>
  std::string Ensure(const typename V::Api* api, uintptr_t device, void* stream,
                     int64_t id, int64_t bytes) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto key = std::make_tuple(device, id, bytes);
    if (workspaces_.count(key)) return {};
    typename V::ScopedDevice scoped(api, device);
    uint64_t address = 0;
    if (int s = V::AllocZeroed(api, static_cast<size_t>(bytes), stream,
                               &address)) {
      return "allocating a workspace of " + std::to_string(bytes) +
             " bytes failed: " + V::ErrorString(api, s);
    }
    workspaces_.emplace(key, address);
    return {};
  }

 private:
  std::shared_mutex mu_;
  std::map<std::tuple<uintptr_t, int64_t, int64_t>, uint64_t> workspaces_;
};

// What both stages do first: check the description against the call's
// buffers, reach the driver API and find the stream's device.
template <typename V>
xla::ffi::Error Prologue(void* stream, const LaunchDescription& d,
                         size_t num_args, size_t num_rets,
                         const typename V::Api** api, uintptr_t* device) {
  using xla::ffi::ErrorCode;
  if (std::string why = ValidateDescription(d, num_args, num_rets);
      !why.empty()) {
    return LaunchError(d, ErrorCode::kInvalidArgument, why);
  }
  std::string error;
  *api = V::Load(&error);
  if (*api == nullptr) return LaunchError(d, ErrorCode::kUnavailable, error);
  if (int s = V::DeviceKey(*api, stream, device)) {
    return LaunchError(d, ErrorCode::kInternal,
                       "finding the stream's device failed: " +
                           V::ErrorString(*api, s));
  }
  return xla::ffi::Error::Success();
}

template <typename V>
xla::ffi::Error InitializeLaunch(void* stream, const LaunchDescription& d,
                                 size_t num_args, size_t num_rets) {
  using xla::ffi::ErrorCode;
  const typename V::Api* api = nullptr;
  uintptr_t device = 0;
  if (xla::ffi::Error e = Prologue<V>(stream, d, num_args, num_rets, &api,
                                      &device);
      e.failure()) {
    return e;
  }
  std::string error;
  if (int64_t bytes = WorkspaceBytes(d);
      bytes > 0 &&
      WorkspaceCache::Get().Find(device, d.workspace_id, bytes) == 0) {
    error = WorkspaceCache::Get().Ensure<V>(api, device, stream,
                                            d.workspace_id, bytes);
    if (!error.empty()) {
      return LaunchError(d, ErrorCode::kResourceExhausted, error);
    }
  }
  ModuleCache<V>& cache = ModuleCache<V>::Get();
  typename ModuleCache<V>::Function f;
  if (cache.Find(device, d.code_hash, d.kernel, &f) &&
      f.shared_limit >= d.shared_mem) {
    return xla::ffi::Error::Success();
  }
  ErrorCode code = ErrorCode::kInternal;
  error = cache.Ensure(api, device, d.code_hash, d.kernel, d.shared_mem, &code);
  if (!error.empty()) return LaunchError(d, code, error);
  return xla::ffi::Error::Success();
}

template <typename V>
xla::ffi::Error ExecuteLaunch(void* stream, const LaunchDescription& d,
                              xla::ffi::RemainingArgs args,
                              xla::ffi::RemainingRets rets) {
  using xla::ffi::ErrorCode;
  const typename V::Api* api = nullptr;
  uintptr_t device = 0;
  if (xla::ffi::Error e = Prologue<V>(stream, d, args.size(), rets.size(),
                                      &api, &device);
      e.failure()) {
    return e;
  }
  std::string error;
  typename ModuleCache<V>::Function f;
  if (!ModuleCache<V>::Get().Find(device, d.code_hash, d.kernel, &f) ||
      f.shared_limit < d.shared_mem) {
    return LaunchError(d, ErrorCode::kFailedPrecondition,
                       "not loaded for this device (the initialize stage "
                       "did not run or failed)");
  }

  uint64_t workspace = 0;
  if (int64_t bytes = WorkspaceBytes(d); bytes > 0) {
    workspace = WorkspaceCache::Get().Find(device, d.workspace_id, bytes);
    if (workspace == 0) {
      return LaunchError(d, ErrorCode::kFailedPrecondition,
                         "its workspace is not allocated on this device (the "
                         "initialize stage did not run or failed)");
    }
  }

  size_t num_buffers = args.size() + rets.size();
  if (num_buffers > kMaxBuffers) {
    return LaunchError(d, ErrorCode::kInvalidArgument,
                       std::to_string(num_buffers) + " buffers exceed " +
                           std::to_string(kMaxBuffers));
  }
  uint64_t addresses[kMaxBuffers];
  void* results[kMaxBuffers];
  size_t result_bytes[kMaxBuffers];
  for (size_t i = 0; i < args.size(); ++i) {
    auto buffer = args.get<xla::ffi::AnyBuffer>(i);
    if (!buffer.has_value()) {
      return LaunchError(d, ErrorCode::kInvalidArgument,
                         "operand " + std::to_string(i) + " is not a buffer");
    }
    addresses[i] = reinterpret_cast<uint64_t>(buffer->untyped_data());
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buffer = rets.get<xla::ffi::AnyBuffer>(i);
    if (!buffer.has_value()) {
      return LaunchError(d, ErrorCode::kInvalidArgument,
                         "result " + std::to_string(i) + " is not a buffer");
    }
    results[i] = (*buffer)->untyped_data();
    result_bytes[i] = (*buffer)->size_bytes();
    addresses[args.size() + i] = reinterpret_cast<uint64_t>(results[i]);
  }

  alignas(16) uint8_t kernargs[kMaxKernargSize];
  error = PackKernargs(d.arg_kinds.begin(), d.arg_values.begin(),
                       d.arg_offsets.begin(), d.arg_kinds.size(),
                       d.kernarg_size, addresses, num_buffers, workspace,
                       kernargs);
  if (!error.empty()) {
    return LaunchError(d, ErrorCode::kInvalidArgument, error);
  }

  for (int64_t r : d.zero_outputs) {
    if (result_bytes[r] == 0) continue;
    if (int s = V::MemsetZero(api, results[r], result_bytes[r], stream)) {
      return LaunchError(d, ErrorCode::kInternal,
                         "zeroing result " + std::to_string(r) +
                             " failed: " + V::ErrorString(api, s));
    }
  }

  const uint32_t grid[3] = {static_cast<uint32_t>(d.grid[0]),
                            static_cast<uint32_t>(d.grid[1]),
                            static_cast<uint32_t>(d.grid[2])};
  const uint32_t block[3] = {static_cast<uint32_t>(d.block[0]),
                             static_cast<uint32_t>(d.block[1]),
                             static_cast<uint32_t>(d.block[2])};
  if (int s = V::Launch(api, f.handle, grid, block,
                        static_cast<uint32_t>(d.shared_mem), stream, kernargs,
                        static_cast<size_t>(d.kernarg_size))) {
    return LaunchError(d, ErrorCode::kInternal,
                       "launch failed: " + V::ErrorString(api, s));
  }
  return xla::ffi::Error::Success();
}

}  // namespace jax_mxfp4_moe

#endif  // JAX_MXFP4_MOE_FFI_LAUNCHER_H_
