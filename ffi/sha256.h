// SHA-256 (FIPS 180-4), used to check that code-object bytes match the
// content hash a launch names before they are handed to the GPU driver.
#ifndef JAX_MXFP4_MOE_FFI_SHA256_H_
#define JAX_MXFP4_MOE_FFI_SHA256_H_

#include <cstddef>
#include <string>
#include <string_view>

namespace jax_mxfp4_moe {

// Lower-case hex digest (64 characters) of `data`.
std::string Sha256Hex(std::string_view data);

// True if `s` has the form of a digest: 64 characters of [0-9a-f].
bool IsSha256Hex(std::string_view s);

}  // namespace jax_mxfp4_moe

#endif  // JAX_MXFP4_MOE_FFI_SHA256_H_
