// Code objects (cubin / hsaco bytes) named by their SHA-256: an in-process
// store filled from Python, then files `<dir>/<hash>.bin` along a search path
// (the package's shipped objects, then the user cache). Bytes are checked
// against their name before anyone loads them.
#ifndef JAX_MXFP4_MOE_FFI_CODE_STORE_H_
#define JAX_MXFP4_MOE_FFI_CODE_STORE_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace jax_mxfp4_moe {

// Adds `data` under `hash`. Returns an empty string on success, else why not
// (malformed hash, or bytes whose digest differs).
std::string StoreCodeObject(std::string_view hash, std::string data);

// Replaces the directories searched for `<hash>.bin`, in order.
void SetSearchPaths(std::vector<std::string> paths);
std::vector<std::string> SearchPaths();

// Finds the bytes named `hash`. On failure returns nullptr and sets `error`.
std::shared_ptr<const std::string> FindCodeObject(std::string_view hash,
                                                  std::string* error);

}  // namespace jax_mxfp4_moe

#endif  // JAX_MXFP4_MOE_FFI_CODE_STORE_H_
