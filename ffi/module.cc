// nanobind module `jax_mxfp4_moe._launcher`: the FFI handler capsules, the
// in-process code-object store and its search path, and the kernarg packer
// (the function the handlers use, exposed so it is tested without a GPU).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "code_store.h"
#include "handlers.h"
#include "kernargs.h"
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "nanobind/stl/vector.h"
#include "sha256.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict Stages(XLA_FFI_Handler* initialize, XLA_FFI_Handler* execute) {
  nb::dict d;
  d["initialize"] = Capsule(initialize);
  d["execute"] = Capsule(execute);
  return d;
}

nb::bytes PackKernargs(const std::vector<int64_t>& kinds,
                       const std::vector<int64_t>& values,
                       const std::vector<int64_t>& offsets, int64_t size,
                       const std::vector<uint64_t>& buffer_addresses,
                       uint64_t workspace_address) {
  if (values.size() != kinds.size() || offsets.size() != kinds.size()) {
    throw nb::value_error("kinds, values and offsets must have equal lengths");
  }
  if (size < 0 || size > jax_mxfp4_moe::kMaxKernargSize) {
    throw nb::value_error(("size " + std::to_string(size) +
                           " is outside [0, " +
                           std::to_string(jax_mxfp4_moe::kMaxKernargSize) +
                           "]").c_str());
  }
  std::string out(static_cast<size_t>(size), '\0');
  std::string error = jax_mxfp4_moe::PackKernargs(
      kinds.data(), values.data(), offsets.data(), kinds.size(), size,
      buffer_addresses.data(), buffer_addresses.size(), workspace_address,
      reinterpret_cast<uint8_t*>(out.data()));
  if (!error.empty()) throw nb::value_error(error.c_str());
  return nb::bytes(out.data(), out.size());
}

}  // namespace

NB_MODULE(_launcher, m) {
  m.doc() = "XLA FFI launcher of GPU code objects named by content hash.";

  m.attr("TARGET_NAME") = "jax_mxfp4_moe_launch";
  m.attr("MAX_KERNARG_SIZE") = jax_mxfp4_moe::kMaxKernargSize;
  m.attr("DRY_RUN_WORKSPACE") = jax_mxfp4_moe::kDryRunWorkspace;

  m.def(
      "registrations",
      [] {
        nb::dict d;
        d["CUDA"] = Stages(JaxMxfp4MoeLaunchCudaInitialize,
                           JaxMxfp4MoeLaunchCudaExecute);
        d["ROCM"] = Stages(JaxMxfp4MoeLaunchRocmInitialize,
                           JaxMxfp4MoeLaunchRocmExecute);
        return d;
      },
      "Handler stages of the launch target per platform name.");

  m.def(
      "dry_run_handler", [] { return Capsule(JaxMxfp4MoeLaunchDryRun); },
      "Execute handler of the CPU dry-run target.");

  m.def(
      "store_code_object",
      [](const std::string& hash, nb::bytes data) {
        std::string error = jax_mxfp4_moe::StoreCodeObject(
            hash, std::string(data.c_str(), data.size()));
        if (!error.empty()) throw nb::value_error(error.c_str());
      },
      nb::arg("hash"), nb::arg("data"),
      "Adds code-object bytes to the in-process store under their SHA-256.");

  m.def(
      "has_code_object",
      [](const std::string& hash) {
        std::string error;
        return jax_mxfp4_moe::FindCodeObject(hash, &error) != nullptr;
      },
      nb::arg("hash"),
      "True if the launcher can find the code object (store or search path).");

  m.def(
      "set_search_paths",
      [](std::vector<std::string> paths) {
        jax_mxfp4_moe::SetSearchPaths(std::move(paths));
      },
      nb::arg("paths"), "Directories searched for <hash>.bin, in order.");

  m.def("search_paths", &jax_mxfp4_moe::SearchPaths);

  m.def(
      "sha256_hex",
      [](nb::bytes data) {
        return jax_mxfp4_moe::Sha256Hex(
            std::string_view(data.c_str(), data.size()));
      },
      nb::arg("data"), "The SHA-256 the launcher computes, as hex.");

  m.def("pack_kernargs", &PackKernargs, nb::arg("kinds"), nb::arg("values"),
        nb::arg("offsets"), nb::arg("size"), nb::arg("buffer_addresses"),
        nb::arg("workspace_address") = 0,
        "The kernarg bytes a launch with these buffer (and workspace) "
        "addresses passes.");
}
