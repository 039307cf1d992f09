#include "code_store.h"

#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "sha256.h"

namespace jax_mxfp4_moe {
namespace {

struct Registry {
  std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<const std::string>> objects;
  std::vector<std::string> search_paths;
};

Registry& GetRegistry() {
  static auto* registry = new Registry();  // never destroyed: used at exit
  return *registry;
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in),
              std::istreambuf_iterator<char>());
  return !in.bad();
}

}  // namespace

std::string StoreCodeObject(std::string_view hash, std::string data) {
  if (!IsSha256Hex(hash)) {
    return "code object name '" + std::string(hash) +
           "' is not a lower-case SHA-256 hex digest";
  }
  std::string digest = Sha256Hex(data);
  if (digest != hash) {
    return "code object bytes have SHA-256 " + digest + ", not " +
           std::string(hash);
  }
  auto bytes = std::make_shared<const std::string>(std::move(data));
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.objects[std::string(hash)] = std::move(bytes);
  return {};
}

void SetSearchPaths(std::vector<std::string> paths) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.search_paths = std::move(paths);
}

std::vector<std::string> SearchPaths() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.search_paths;
}

std::shared_ptr<const std::string> FindCodeObject(std::string_view hash,
                                                  std::string* error) {
  if (!IsSha256Hex(hash)) {
    *error = "code_hash '" + std::string(hash) +
             "' is not a lower-case SHA-256 hex digest";
    return nullptr;
  }
  Registry& r = GetRegistry();
  std::vector<std::string> paths;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.objects.find(std::string(hash));
    if (it != r.objects.end()) return it->second;
    paths = r.search_paths;
  }
  std::ostringstream tried;
  for (const std::string& dir : paths) {
    std::string path = dir + "/" + std::string(hash) + ".bin";
    std::string data;
    if (!ReadFile(path, &data)) {
      tried << " " << path << " (missing)";
      continue;
    }
    if (Sha256Hex(data) != hash) {
      tried << " " << path << " (content does not match its hash)";
      continue;
    }
    auto bytes = std::make_shared<const std::string>(std::move(data));
    std::lock_guard<std::mutex> lock(r.mu);
    r.objects.emplace(std::string(hash), bytes);
    return bytes;
  }
  *error = "code object " + std::string(hash) +
           " is neither in the in-process store nor in the search path;" +
           (paths.empty() ? std::string(" no search path set") : tried.str());
  return nullptr;
}

}  // namespace jax_mxfp4_moe
