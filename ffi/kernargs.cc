#include "kernargs.h"

#include <cstring>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kernarg packing assumes a little-endian host"
#endif

namespace jax_mxfp4_moe {
namespace {

std::string ParamPrefix(size_t i) {
  return "parameter " + std::to_string(i) + ": ";
}

}  // namespace

std::string PackKernargs(const int64_t* kinds, const int64_t* values,
                         const int64_t* offsets, size_t num_params,
                         int64_t size, const uint64_t* buffers,
                         size_t num_buffers, uint64_t workspace, uint8_t* out) {
  if (size < 0 || size > kMaxKernargSize) {
    return "kernarg_size " + std::to_string(size) + " is outside [0, " +
           std::to_string(kMaxKernargSize) + "]";
  }
  std::memset(out, 0, static_cast<size_t>(size));
  // Bytes already written, to reject overlapping parameters.
  uint8_t used[kMaxKernargSize] = {};
  for (size_t i = 0; i < num_params; ++i) {
    int64_t value = values[i];
    int64_t width = 0;
    uint64_t bits = 0;
    switch (static_cast<ArgKind>(kinds[i])) {
      case ArgKind::kBuffer:
      case ArgKind::kAlignedBuffer:
        if (value < 0 || static_cast<uint64_t>(value) >= num_buffers) {
          return ParamPrefix(i) + "buffer index " + std::to_string(value) +
                 " is outside [0, " + std::to_string(num_buffers) + ")";
        }
        width = 8;
        bits = buffers[value];
        if (static_cast<ArgKind>(kinds[i]) == ArgKind::kAlignedBuffer &&
            bits % kBufferAlignment != 0) {
          return ParamPrefix(i) + "buffer " + std::to_string(value) +
                 " is not " + std::to_string(kBufferAlignment) +
                 "-byte aligned (the kernel was compiled assuming it)";
        }
        break;
      case ArgKind::kI32:
        if (value < INT32_MIN || value > INT32_MAX) {
          return ParamPrefix(i) + "i32 value " + std::to_string(value) +
                 " does not fit 32 bits";
        }
        width = 4;
        bits = static_cast<uint32_t>(static_cast<int32_t>(value));
        break;
      case ArgKind::kU32:
      case ArgKind::kF32:
        if (value < 0 || value > int64_t{UINT32_MAX}) {
          return ParamPrefix(i) + "32-bit value " + std::to_string(value) +
                 " is outside [0, 2^32)";
        }
        width = 4;
        bits = static_cast<uint64_t>(value);
        break;
      case ArgKind::kI64:
        width = 8;
        bits = static_cast<uint64_t>(value);
        break;
      case ArgKind::kNull:
        width = 8;
        bits = 0;
        break;
      case ArgKind::kWorkspace:
        width = 8;
        bits = workspace;
        break;
      default:
        return ParamPrefix(i) + "unknown kind " + std::to_string(kinds[i]);
    }
    int64_t offset = offsets[i];
    if (offset < 0 || offset > size - width) {
      return ParamPrefix(i) + "bytes [" + std::to_string(offset) + ", " +
             std::to_string(offset + width) + ") do not fit kernarg_size " +
             std::to_string(size);
    }
    for (int64_t b = 0; b < width; ++b) {
      if (used[offset + b]) {
        return ParamPrefix(i) + "bytes [" + std::to_string(offset) + ", " +
               std::to_string(offset + width) +
               ") overlap an earlier parameter";
      }
      used[offset + b] = 1;
    }
    std::memcpy(out + offset, &bits, static_cast<size_t>(width));
  }
  return {};
}

}  // namespace jax_mxfp4_moe
