// hq-dist's C ABI over libtorch's own c10d: the TCPStore rendezvous and the Gloo (CPU) and NCCL
// (CUDA) process groups that torch.distributed runs, compiled against the torch wheel's headers.
//
// Why a shim and not a port: the point is to speak exactly the protocol and use exactly the
// collectives of the field's runtime (torchrun's store, c10d's Gloo/NCCL algorithms), so
// libtorch_cpu.so / libtorch_cuda.so do the work and this file only translates. Every entry point
// catches C++ exceptions and returns them as a malloc'd message (NULL on success); Rust frees it
// with hq_dist_free. Tensors come in as tch's `at::Tensor*` (torch-sys's C_tensor).
//
// Gloo's own headers are not in the wheel: vendor/gloo holds those of the revision torch 2.11.0
// was built with (see vendor/gloo/REVISION). Only pointers to gloo types cross this file, plus one
// virtual call (Device::str), checked against a known value at start-up so a mismatched layout
// fails loudly (hq_dist_group_new) instead of calling the wrong function.

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef HQ_DIST_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs `f`, turning any exception into an owned message.
template <typename F>
char* guarded(const char* what, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(std::string(what) + ": " + e.what());
  } catch (...) {
    return copy_message(std::string(what) + ": unknown C++ exception");
  }
}

std::chrono::milliseconds ms(int64_t v) { return std::chrono::milliseconds(v); }

// Waits for `work`; a false return (a timeout some backends report that way) is an error too.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, int64_t timeout_ms) {
  if (!work->wait(ms(timeout_ms))) {
    throw std::runtime_error("timed out after " + std::to_string(timeout_ms) + " ms");
  }
}

}  // namespace

struct hq_dist_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct hq_dist_group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

// DDP's gradient reducer over a group: autograd hooks on the parameters all-reduce each bucket
// of gradients as soon as the backward pass has filled it, overlapping communication with the
// rest of the backward (what torch.nn.parallel.DistributedDataParallel does). It averages. It is
// built with find_unused_parameters: a parameter the loss does not reach (an STC head when STC is
// off) is marked ready by a traversal of the graph instead of stalling its bucket.
struct hq_dist_reducer {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  std::shared_ptr<c10d::Reducer> reducer;
};

extern "C" {

void hq_dist_free(char* message) { std::free(message); }

// Connects to (rank 0: serves) the TCPStore at master_addr:port. The server waits up to the
// timeout for world_size clients, as torch.distributed's does.
char* hq_dist_store_new(const char* master_addr, uint16_t port, int rank, int world_size,
                        int64_t timeout_ms, hq_dist_store** out) {
  *out = nullptr;
  return guarded("hq-dist: TCPStore", [&] {
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world_size);
    so.waitWorkers = true;
    so.timeout = ms(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), so);
    // torch.distributed prefixes its keys per group ("default_pg/0/"), so stores can be shared.
    *out = new hq_dist_store{c10::make_intrusive<c10d::PrefixStore>("hq_dist/0", tcp)};
  });
}

void hq_dist_store_free(hq_dist_store* store) { delete store; }

// Creates the process group over `store` (which it shares; the store handle stays the caller's).
// backend: "gloo" or "nccl". gloo_host: the address Gloo's transport binds for this rank, or
// "iface:NAME" for a network interface.
char* hq_dist_group_new(hq_dist_store* store, int rank, int world_size, const char* backend,
                        const char* gloo_host, int64_t timeout_ms, hq_dist_group** out) {
  *out = nullptr;
  std::string name(backend);
  return guarded("hq-dist: process group", [&] {
    auto group = std::make_unique<hq_dist_group>(hq_dist_group{store->store, {}});
    if (name == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
      // "iface:NAME" binds an interface (torch's GLOO_SOCKET_IFNAME), anything else a host.
      const std::string host(gloo_host);
      auto device = host.rfind("iface:", 0) == 0
                        ? c10d::ProcessGroupGloo::createDeviceForInterface(host.substr(6))
                        : c10d::ProcessGroupGloo::createDeviceForHostname(host);
      const std::string desc = device->str();
      if (desc.rfind("tcp", 0) != 0) {
        throw std::runtime_error(
            "the vendored gloo headers do not match libtorch's gloo (Device::str() gave '" + desc +
            "'); see distributed/vendor/gloo/REVISION");
      }
      opts->devices.push_back(device);
      group->backend =
          c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world_size, opts);
    } else if (name == "nccl") {
#ifdef HQ_DIST_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = ms(timeout_ms);
      group->backend =
          c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, rank, world_size, opts);
#else
      throw std::runtime_error("this build of hq-dist has no NCCL support");
#endif
    } else {
      throw std::runtime_error("unknown backend '" + name + "' (gloo, nccl)");
    }
    *out = group.release();
  });
}

void hq_dist_group_free(hq_dist_group* group) {
  try {
    delete group;
  } catch (...) {
    // Tearing down a group whose peers are gone may throw; nothing useful to do then.
  }
}

// op: 0 sum, 1 max, 2 min, 3 product (Gloo has no average: the Rust side divides a sum).
char* hq_dist_all_reduce(hq_dist_group* group, at::Tensor* tensor, int op, int64_t timeout_ms) {
  return guarded("hq-dist: all-reduce", [&] {
    static const c10d::ReduceOp::RedOpType ops[] = {
        c10d::ReduceOp::SUM, c10d::ReduceOp::MAX, c10d::ReduceOp::MIN, c10d::ReduceOp::PRODUCT};
    if (op < 0 || op > 3) throw std::runtime_error("bad reduce op");
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions o;
    o.reduceOp = ops[op];
    o.timeout = ms(timeout_ms);
    wait_for(group->backend->allreduce(tensors, o), timeout_ms);
  });
}

// outputs: world_size tensors shaped like input, filled in rank order.
char* hq_dist_all_gather(hq_dist_group* group, at::Tensor* input, at::Tensor** outputs,
                         size_t n_outputs, int64_t timeout_ms) {
  return guarded("hq-dist: all-gather", [&] {
    std::vector<at::Tensor> in{*input};
    std::vector<std::vector<at::Tensor>> out(1);
    for (size_t i = 0; i < n_outputs; ++i) out[0].push_back(*outputs[i]);
    c10d::AllgatherOptions o;
    o.timeout = ms(timeout_ms);
    wait_for(group->backend->allgather(out, in, o), timeout_ms);
  });
}

char* hq_dist_broadcast(hq_dist_group* group, at::Tensor* tensor, int root, int64_t timeout_ms) {
  return guarded("hq-dist: broadcast", [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.rootTensor = 0;
    o.timeout = ms(timeout_ms);
    wait_for(group->backend->broadcast(tensors, o), timeout_ms);
  });
}

// A reducer over `params`, in buckets of about bucket_bytes, filled in reverse parameter order (the order in which the
// backward pass produces gradients), as DDP assigns them.
char* hq_dist_reducer_new(hq_dist_group* group, at::Tensor** params, size_t n,
                          int64_t bucket_bytes, hq_dist_reducer** out) {
  *out = nullptr;
  return guarded("hq-dist: reducer", [&] {
    const auto& backend = group->backend;
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(group->store, backend->getRank(),
                                                      backend->getSize());
    const bool gloo = backend->getBackendName() == "gloo";
    const auto type = gloo ? c10d::ProcessGroup::BackendType::GLOO
                           : c10d::ProcessGroup::BackendType::NCCL;
    pg->setBackend(gloo ? c10::DeviceType::CPU : c10::DeviceType::CUDA, type, backend);
    pg->setDefaultBackend(type);
    std::vector<at::Tensor> ps;
    for (size_t i = 0; i < n; ++i) ps.push_back(*params[i]);
    const auto cap = static_cast<size_t>(bucket_bytes);
    auto assignment = c10d::compute_bucket_assignment_by_size(ps, {cap}, {}, {});
    auto buckets = std::get<0>(assignment);
    std::reverse(buckets.begin(), buckets.end());
    auto reducer = std::make_shared<c10d::Reducer>(
        ps, buckets, pg, std::vector<bool>(n, false), bucket_bytes,
        /*find_unused_parameters=*/true, /*gradient_as_bucket_view=*/false,
        std::unordered_map<size_t, std::string>{}, /*first_bucket_bytes_cap=*/bucket_bytes,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        std::vector<int64_t>{});
    *out = new hq_dist_reducer{pg, reducer};
  });
}

void hq_dist_reducer_free(hq_dist_reducer* r) {
  try {
    delete r;
  } catch (...) {
  }
}

// Arms the reducer for the next backward pass from `output` (the loss): its gradients are
// averaged over the ranks by the time that backward returns.
char* hq_dist_reducer_prepare(hq_dist_reducer* r, at::Tensor* output) {
  return guarded("hq-dist: reducer", [&] {
    r->reducer->prepare_for_forward();
    r->reducer->prepare_for_backward({*output});
  });
}

char* hq_dist_barrier(hq_dist_group* group, int64_t timeout_ms) {
  return guarded("hq-dist: barrier", [&] {
    c10d::BarrierOptions o;
    o.timeout = ms(timeout_ms);
    wait_for(group->backend->barrier(o), timeout_ms);
  });
}

// The store, for small out-of-band values (agreeing on settings, liveness): set, and a get that
// waits up to the store's timeout for the key. *value is malloc'd; free it with hq_dist_free.
char* hq_dist_store_set(hq_dist_store* store, const char* key, const uint8_t* value, size_t len) {
  return guarded("hq-dist: store set", [&] {
    store->store->set(std::string(key), std::vector<uint8_t>(value, value + len));
  });
}

// Waits up to timeout_ms for `key`.
char* hq_dist_store_get(hq_dist_store* store, const char* key, int64_t timeout_ms,
                        uint8_t** value, size_t* len) {
  *value = nullptr;
  *len = 0;
  return guarded("hq-dist: store get", [&] {
    store->store->wait({std::string(key)}, ms(timeout_ms));
    auto v = store->store->get(std::string(key));
    *value = static_cast<uint8_t*>(std::malloc(v.size() ? v.size() : 1));
    if (*value == nullptr) throw std::bad_alloc();
    std::memcpy(*value, v.data(), v.size());
    *len = v.size();
  });
}

}  // extern "C"
