#include "launch_description.h"

#include "kernargs.h"

namespace jax_mxfp4_moe {
namespace {

constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxBlockThreads = 1024;

std::string Triple(xla::ffi::Span<const int64_t> v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(v[i]);
  }
  return s + ")";
}

}  // namespace

std::string ValidateDescription(const LaunchDescription& d, size_t num_args,
                                size_t num_rets) {
  if (d.grid.size() != 3 || d.block.size() != 3) {
    return "grid and block must have 3 entries, got grid " + Triple(d.grid) +
           " block " + Triple(d.block);
  }
  for (int64_t g : d.grid) {
    if (g < 1 || g > kMaxGrid) {
      return "grid " + Triple(d.grid) + " must be positive and below 2^31";
    }
  }
  int64_t threads = 1;
  for (int64_t b : d.block) {
    if (b < 1 || b > kMaxBlockThreads) {
      return "block " + Triple(d.block) + " must be positive";
    }
    threads *= b;
  }
  if (threads > kMaxBlockThreads) {
    return "block " + Triple(d.block) + " has more than 1024 threads";
  }
  if (d.shared_mem < 0 || d.shared_mem > (int64_t{1} << 31)) {
    return "shared_mem " + std::to_string(d.shared_mem) + " is out of range";
  }
  if (d.arg_values.size() != d.arg_kinds.size() ||
      d.arg_offsets.size() != d.arg_kinds.size()) {
    return "arg_kinds, arg_values and arg_offsets have lengths " +
           std::to_string(d.arg_kinds.size()) + ", " +
           std::to_string(d.arg_values.size()) + ", " +
           std::to_string(d.arg_offsets.size()) + " (must be equal)";
  }
  for (int64_t r : d.zero_outputs) {
    if (r < 0 || static_cast<size_t>(r) >= num_rets) {
      return "zero_outputs entry " + std::to_string(r) +
             " is not a result index in [0, " + std::to_string(num_rets) +
             ")";
    }
  }
  int workspaces = 0;
  for (size_t i = 0; i < d.arg_kinds.size(); ++i) {
    if (d.arg_kinds[i] != static_cast<int64_t>(ArgKind::kWorkspace)) continue;
    if (++workspaces > 1) return "more than one workspace parameter";
    if (d.arg_values[i] < 1 || d.arg_values[i] > kMaxWorkspaceBytes) {
      return "workspace of " + std::to_string(d.arg_values[i]) +
             " bytes is outside [1, 2^30]";
    }
  }
  if ((workspaces == 1) != (d.workspace_id != 0)) {
    return workspaces ? "a workspace parameter needs a nonzero workspace_id"
                      : "workspace_id is set but no parameter is a workspace";
  }
  (void)num_args;  // buffer indices are checked while packing
  return {};
}

int64_t WorkspaceBytes(const LaunchDescription& d) {
  for (size_t i = 0; i < d.arg_kinds.size(); ++i) {
    if (d.arg_kinds[i] == static_cast<int64_t>(ArgKind::kWorkspace)) {
      return d.arg_values[i];
    }
  }
  return 0;
}

xla::ffi::Error LaunchError(const LaunchDescription& d,
                            xla::ffi::ErrorCode code,
                            const std::string& reason) {
  return xla::ffi::Error(code, std::string(kTargetName) + ": kernel '" +
                                   std::string(d.kernel) + "' (code object " +
                                   std::string(d.code_hash) + "): " + reason);
}

}  // namespace jax_mxfp4_moe
