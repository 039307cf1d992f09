// Vendor shim: the few GPU driver calls the launcher needs, for the CUDA
// driver API (libcuda) and HIP (libamdhip64), reached through dlopen at first
// use so the extension has no link-time dependency on either and imports on
// machines without a GPU. The handler body (launcher.h) is a template over
// these two structs, as jaxlib/gpu/vendor.h lets one source serve both.
//
// Only opaque handles cross this boundary, so no vendor header is needed: the
// signatures below are the drivers' C ABI with handles as void*.
#ifndef JAX_MXFP4_MOE_FFI_VENDOR_H_
#define JAX_MXFP4_MOE_FFI_VENDOR_H_

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

namespace jax_mxfp4_moe {

// Resolves `name` from `lib` into `*fn`; appends to `missing` if absent.
template <typename Fn>
void Resolve(void* lib, const char* name, Fn* fn, std::string* missing) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (*fn == nullptr) *missing += std::string(" ") + name;
}

// Opens the driver library: one of `names` already loaded into the process
// (by XLA's GPU plugin) if any, so both use the same runtime instance; else
// the first that loads. Sets `error` if none does.
inline void* OpenFirst(const char* const* names, size_t count,
                       std::string* error) {
  for (size_t i = 0; i < count; ++i) {
    if (void* lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)) {
      return lib;
    }
  }
  std::string tried;
  for (size_t i = 0; i < count; ++i) {
    if (void* lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL)) return lib;
    const char* why = dlerror();
    tried += std::string(" ") + names[i] + " (" + (why ? why : "?") + ")";
  }
  *error = "cannot open the GPU driver library:" + tried;
  return nullptr;
}

//===----------------------------------------------------------------------===//
// CUDA driver API
//===----------------------------------------------------------------------===//

struct CudaVendor {
  static constexpr const char* kPlatform = "CUDA";
  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
  static constexpr int kAttrMaxDynamicShared = 8;
  // Dynamic shared memory a kernel may use without opting in.
  static constexpr int64_t kDefaultSharedLimit = 48 * 1024;

  struct Api {
    int (*ModuleLoadData)(void** module, const void* image);
    int (*ModuleGetFunction)(void** function, void* module, const char* name);
    int (*FuncSetAttribute)(void* function, int attribute, int value);
    int (*LaunchKernel)(void* function, unsigned gx, unsigned gy, unsigned gz,
                        unsigned bx, unsigned by, unsigned bz, unsigned shared,
                        void* stream, void** params, void** extra);
    int (*MemsetD8Async)(uint64_t ptr, unsigned char value, size_t count,
                         void* stream);
    int (*MemAlloc)(uint64_t* ptr, size_t bytes);
    int (*StreamSynchronize)(void* stream);
    int (*GetErrorString)(int status, const char** text);
    int (*StreamGetCtx)(void* stream, void** context);
    int (*CtxGetCurrent)(void** context);
    int (*CtxPushCurrent)(void* context);
    int (*CtxPopCurrent)(void** context);
  };

  // The driver table, loaded once; nullptr (and `error`) if unavailable.
  static const Api* Load(std::string* error) {
    static std::once_flag once;
    static Api api;
    static std::string load_error;
    std::call_once(once, [] {
      static const char* const kNames[] = {"libcuda.so.1", "libcuda.so"};
      void* lib = OpenFirst(kNames, 2, &load_error);
      if (lib == nullptr) return;
      std::string missing;
      Resolve(lib, "cuModuleLoadData", &api.ModuleLoadData, &missing);
      Resolve(lib, "cuModuleGetFunction", &api.ModuleGetFunction, &missing);
      Resolve(lib, "cuFuncSetAttribute", &api.FuncSetAttribute, &missing);
      Resolve(lib, "cuLaunchKernel", &api.LaunchKernel, &missing);
      Resolve(lib, "cuMemsetD8Async", &api.MemsetD8Async, &missing);
      Resolve(lib, "cuMemAlloc_v2", &api.MemAlloc, &missing);
      Resolve(lib, "cuStreamSynchronize", &api.StreamSynchronize, &missing);
      Resolve(lib, "cuGetErrorString", &api.GetErrorString, &missing);
      Resolve(lib, "cuStreamGetCtx", &api.StreamGetCtx, &missing);
      Resolve(lib, "cuCtxGetCurrent", &api.CtxGetCurrent, &missing);
      Resolve(lib, "cuCtxPushCurrent_v2", &api.CtxPushCurrent, &missing);
      Resolve(lib, "cuCtxPopCurrent_v2", &api.CtxPopCurrent, &missing);
      if (!missing.empty()) load_error = "libcuda lacks:" + missing;
    });
    if (!load_error.empty()) {
      *error = load_error;
      return nullptr;
    }
    return &api;
  }

  static std::string ErrorString(const Api* api, int status) {
    const char* text = nullptr;
    api->GetErrorString(status, &text);
    return "CUDA error " + std::to_string(status) + (text ? ": " : "") +
           (text ? text : "");
  }

  // Modules belong to a context: the stream's context keys the cache.
  static int DeviceKey(const Api* api, void* stream, uintptr_t* key) {
    void* context = nullptr;
    int status = stream ? api->StreamGetCtx(stream, &context)
                        : api->CtxGetCurrent(&context);
    *key = reinterpret_cast<uintptr_t>(context);
    return status;
  }

  // Makes the keyed context current for module loading, if it is not.
  class ScopedDevice {
   public:
    ScopedDevice(const Api* api, uintptr_t key) : api_(api) {
      void* current = nullptr;
      void* wanted = reinterpret_cast<void*>(key);
      if (api_->CtxGetCurrent(&current) == 0 && current != wanted &&
          wanted != nullptr) {
        pushed_ = api_->CtxPushCurrent(wanted) == 0;
      }
    }
    ~ScopedDevice() {
      if (pushed_) {
        void* popped = nullptr;
        api_->CtxPopCurrent(&popped);
      }
    }

   private:
    const Api* api_;
    bool pushed_ = false;
  };

  static int SetSharedMemory(const Api* api, void* function, int64_t bytes) {
    if (bytes <= kDefaultSharedLimit) return 0;
    return api->FuncSetAttribute(function, kAttrMaxDynamicShared,
                                 static_cast<int>(bytes));
  }

  static int Launch(const Api* api, void* function, const uint32_t grid[3],
                    const uint32_t block[3], uint32_t shared, void* stream,
                    void* kernargs, size_t size) {
    // CU_LAUNCH_PARAM_BUFFER_POINTER, _SIZE, _END
    void* extra[] = {reinterpret_cast<void*>(1), kernargs,
                     reinterpret_cast<void*>(2), &size,
                     reinterpret_cast<void*>(0)};
    return api->LaunchKernel(function, grid[0], grid[1], grid[2], block[0],
                             block[1], block[2], shared, stream, nullptr,
                             extra);
  }

  static int MemsetZero(const Api* api, void* ptr, size_t bytes,
                        void* stream) {
    return api->MemsetD8Async(reinterpret_cast<uint64_t>(ptr), 0, bytes,
                              stream);
  }

  // Device memory of the current context, zeroed before this returns. The
  // memset goes on `stream` and is waited for: a memset on the legacy
  // default stream would not be ordered before launches on XLA's
  // (non-blocking) streams.
  static int AllocZeroed(const Api* api, size_t bytes, void* stream,
                         uint64_t* ptr) {
    if (int s = api->MemAlloc(ptr, bytes)) return s;
    if (int s = api->MemsetD8Async(*ptr, 0, bytes, stream)) return s;
    return api->StreamSynchronize(stream);
  }
};

//===----------------------------------------------------------------------===//
// HIP
//===----------------------------------------------------------------------===//

struct HipVendor {
  static constexpr const char* kPlatform = "ROCM";

  struct Api {
    int (*ModuleLoadData)(void** module, const void* image);
    int (*ModuleGetFunction)(void** function, void* module, const char* name);
    int (*ModuleLaunchKernel)(void* function, unsigned gx, unsigned gy,
                              unsigned gz, unsigned bx, unsigned by,
                              unsigned bz, unsigned shared, void* stream,
                              void** params, void** extra);
    int (*MemsetAsync)(void* ptr, int value, size_t count, void* stream);
    int (*Malloc)(void** ptr, size_t bytes);
    int (*StreamSynchronize)(void* stream);
    const char* (*GetErrorString)(int status);
    int (*GetStreamDeviceId)(void* stream);
    int (*GetDevice)(int* device);
    int (*SetDevice)(int device);
  };

  static const Api* Load(std::string* error) {
    static std::once_flag once;
    static Api api;
    static std::string load_error;
    std::call_once(once, [] {
      static const char* const kNames[] = {"libamdhip64.so",
                                           "libamdhip64.so.7",
                                           "libamdhip64.so.6"};
      void* lib = OpenFirst(kNames, 3, &load_error);
      if (lib == nullptr) return;
      std::string missing;
      Resolve(lib, "hipModuleLoadData", &api.ModuleLoadData, &missing);
      Resolve(lib, "hipModuleGetFunction", &api.ModuleGetFunction, &missing);
      Resolve(lib, "hipModuleLaunchKernel", &api.ModuleLaunchKernel,
              &missing);
      Resolve(lib, "hipMemsetAsync", &api.MemsetAsync, &missing);
      Resolve(lib, "hipMalloc", &api.Malloc, &missing);
      Resolve(lib, "hipStreamSynchronize", &api.StreamSynchronize, &missing);
      Resolve(lib, "hipGetErrorString", &api.GetErrorString, &missing);
      Resolve(lib, "hipGetStreamDeviceId", &api.GetStreamDeviceId, &missing);
      Resolve(lib, "hipGetDevice", &api.GetDevice, &missing);
      Resolve(lib, "hipSetDevice", &api.SetDevice, &missing);
      if (!missing.empty()) load_error = "libamdhip64 lacks:" + missing;
    });
    if (!load_error.empty()) {
      *error = load_error;
      return nullptr;
    }
    return &api;
  }

  static std::string ErrorString(const Api* api, int status) {
    const char* text = api->GetErrorString(status);
    return "HIP error " + std::to_string(status) + (text ? ": " : "") +
           (text ? text : "");
  }

  // Modules belong to a device: the stream's device id keys the cache.
  static int DeviceKey(const Api* api, void* stream, uintptr_t* key) {
    int device = api->GetStreamDeviceId(stream);
    if (device < 0) return 101;  // hipErrorInvalidDevice
    *key = static_cast<uintptr_t>(device);
    return 0;
  }

  class ScopedDevice {
   public:
    ScopedDevice(const Api* api, uintptr_t key) : api_(api) {
      int wanted = static_cast<int>(key);
      if (api_->GetDevice(&previous_) == 0 && previous_ != wanted) {
        switched_ = api_->SetDevice(wanted) == 0;
      }
    }
    ~ScopedDevice() {
      if (switched_) api_->SetDevice(previous_);
    }

   private:
    const Api* api_;
    int previous_ = -1;
    bool switched_ = false;
  };

  // AMD GPUs take dynamic LDS up to the device limit without an opt-in.
  static int SetSharedMemory(const Api*, void*, int64_t) { return 0; }

  static int Launch(const Api* api, void* function, const uint32_t grid[3],
                    const uint32_t block[3], uint32_t shared, void* stream,
                    void* kernargs, size_t size) {
    // HIP_LAUNCH_PARAM_BUFFER_POINTER, _SIZE, _END
    void* extra[] = {reinterpret_cast<void*>(1), kernargs,
                     reinterpret_cast<void*>(2), &size,
                     reinterpret_cast<void*>(3)};
    return api->ModuleLaunchKernel(function, grid[0], grid[1], grid[2],
                                   block[0], block[1], block[2], shared,
                                   stream, nullptr, extra);
  }

  static int MemsetZero(const Api* api, void* ptr, size_t bytes,
                        void* stream) {
    return api->MemsetAsync(ptr, 0, bytes, stream);
  }

  // Device memory of the current device, zeroed before this returns (the
  // memset on `stream`, waited for: see CudaVendor::AllocZeroed).
  static int AllocZeroed(const Api* api, size_t bytes, void* stream,
                         uint64_t* ptr) {
    void* p = nullptr;
    if (int s = api->Malloc(&p, bytes)) return s;
    *ptr = reinterpret_cast<uint64_t>(p);
    if (int s = api->MemsetAsync(p, 0, bytes, stream)) return s;
    return api->StreamSynchronize(stream);
  }
};

}  // namespace jax_mxfp4_moe

#endif  // JAX_MXFP4_MOE_FFI_VENDOR_H_
