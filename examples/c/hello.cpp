// hello.cpp - the canonical PCCL training loop in C++ (C++17).
//
//   hello_cpp [STEPS [MASTER_IP:PORT]]      (defaults: 5, 127.0.0.1:48148)
//
// The same program as hello.c, written the way a C++ code base would wrap the
// C API: errors become exceptions carrying the result code and the library's
// message, and the communicator is owned by an RAII handle. C and C++ peers
// can train together (they run the identical protocol and update rule).
//
// Build: c++ -std=c++17 hello.cpp $(pkg-config --cflags --libs pccl)

#include <pccl.h>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t kWeights = 1024;

// A failed PCCL call.
class PcclError : public std::runtime_error {
public:
    PcclError(const char *what, pcclResult_t result)
        : std::runtime_error(describe(what, result)), result_(result) {}
    pcclResult_t result() const { return result_; }

private:
    static std::string describe(const char *what, pcclResult_t result) {
        const char *name = "?";
        pcclGetResultString(result, &name);
        return std::string(what) + " failed: " + name + " (" + pcclGetLastErrorString() + ")";
    }
    pcclResult_t result_;
};

void check(pcclResult_t result, const char *what) {
    if (result != pcclSuccess) {
        throw PcclError(what, result);
    }
}

// Owns a pcclComm_t.
struct CommDeleter {
    void operator()(pcclComm_t *comm) const { pcclDestroyCommunicator(comm); }
};
using Communicator = std::unique_ptr<pcclComm_t, CommDeleter>;

Communicator create_communicator(const ccoip_socket_address_t &master) {
    pcclCommCreateParams_t params{};
    params.master_address = master;
    params.peer_group = 0;
    params.p2p_connection_pool_size = 1;
    pcclComm_t *raw = nullptr;
    check(pcclCreateCommunicator(&params, &raw), "pcclCreateCommunicator");
    return Communicator(raw);
}

int attribute(const Communicator &comm, pcclAttribute_t which) {
    int value = 0;
    check(pcclGetAttribute(comm.get(), which, &value), "pcclGetAttribute");
    return value;
}

std::uint64_t checksum(const std::vector<float> &w) {
    std::uint64_t h = 1469598103934665603ULL;
    const auto *p = reinterpret_cast<const unsigned char *>(w.data());
    for (std::size_t i = 0; i < w.size() * sizeof(float); ++i) {
        h = (h ^ p[i]) * 1099511628211ULL;
    }
    return h;
}

bool parse_address(const char *text, ccoip_socket_address_t &addr) {
    unsigned a, b, c, d, port;
    if (std::sscanf(text, "%u.%u.%u.%u:%u", &a, &b, &c, &d, &port) != 5 || a > 255 || b > 255 ||
        c > 255 || d > 255 || port == 0 || port > 65535) {
        return false;
    }
    addr = ccoip_socket_address_t{};
    addr.inet.protocol = inetIPv4;
    addr.inet.ipv4.data[0] = static_cast<std::uint8_t>(a);
    addr.inet.ipv4.data[1] = static_cast<std::uint8_t>(b);
    addr.inet.ipv4.data[2] = static_cast<std::uint8_t>(c);
    addr.inet.ipv4.data[3] = static_cast<std::uint8_t>(d);
    addr.port = static_cast<std::uint16_t>(port);
    return true;
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

int run(long steps, const ccoip_socket_address_t &master) {
    check(pcclInit(), "pcclInit");
    Communicator comm = create_communicator(master);

    // 1. Connect, retrying while the master is not up yet.
    for (int attempt = 1;; ++attempt) {
        const pcclResult_t r = pcclConnect(comm.get());
        if (r == pcclSuccess) {
            break;
        }
        if (attempt == 10) {
            check(r, "pcclConnect");
        }
        std::fprintf(stderr, "connect attempt %d failed (%s); retrying\n", attempt, pcclGetLastErrorString());
        sleep_ms(1000);
    }

    std::vector<float> weights(kWeights, 0.0f), grad(kWeights, 0.0f);
    pcclTensorInfo_t tensor{};
    tensor.name = "weights";
    tensor.data = weights.data();
    tensor.count = weights.size();
    tensor.datatype = pcclFloat;
    tensor.device_type = pcclDeviceCpu;
    tensor.allow_content_inequality = false;
    pcclSharedState_t state{};
    state.revision = 0;
    state.count = 1;
    state.infos = &tensor;
    const auto seed = static_cast<unsigned>(getpid());

    long step = 0;
    for (long pass = 0; step < steps; ++pass) {
        // 2a. Let waiting peers join; not on this peer's first pass (see hello.c).
        if (pass > 0) {
            bool pending = false;
            const int world = attribute(comm, PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE);
            if (world > 1) {
                check(pcclArePeersPending(comm.get(), &pending), "pcclArePeersPending");
            }
            if (world == 1 || pending) {
                const pcclResult_t r = pcclUpdateTopology(comm.get());
                if (r != pcclUpdateTopologyFailed) {
                    check(r, "pcclUpdateTopology");
                }
            }
        }
        if (attribute(comm, PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE) < 2) {
            std::printf("waiting for peers...\n");
            std::fflush(stdout);
            sleep_ms(200);
            continue;
        }

        // 2b. Weights identical to the group's; a newcomer adopts its step.
        state.revision = static_cast<std::uint64_t>(step);
        check(pcclSynchronizeSharedState(comm.get(), &state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR,
                                         nullptr),
              "pcclSynchronizeSharedState");
        step = static_cast<long>(state.revision);

        // 2c. Local gradient, averaged over the peers (retried if one dies).
        for (std::size_t i = 0; i < kWeights; ++i) {
            grad[i] = weights[i] * 0.01f - static_cast<float>(static_cast<unsigned>(i) * 7u + seed) / 4096.0f;
        }
        pcclReduceOpDescriptor_t op{};
        op.sendbuf = grad.data();
        op.recvbuf = grad.data();
        op.descriptor.count = grad.size();
        op.descriptor.op = pcclAvg;
        op.descriptor.tag = static_cast<std::uint64_t>(step);
        op.descriptor.src_descriptor.datatype = pcclFloat;
        op.descriptor.src_descriptor.distribution_hint = pcclDistributionNone;
        op.descriptor.quantization_options.algorithm = pcclQuantNone;
        pcclReduceInfo_t info{};
        const pcclResult_t r = pcclAllReduceMultipleWithRetry(&op, 1, comm.get(), &info, 1);
        if (r == pcclTooFewPeers) {
            ++step;
            continue;
        }
        check(r, "pcclAllReduceMultipleWithRetry");

        // 2d. The same update everywhere keeps the weights bit-identical.
        for (std::size_t i = 0; i < kWeights; ++i) {
            weights[i] -= 0.5f * grad[i];
        }
        std::printf("step %ld world %u checksum %016llx\n", step, info.local_world_size,
                    static_cast<unsigned long long>(checksum(weights)));
        std::fflush(stdout);
        ++step;
    }
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    const long steps = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 5;
    ccoip_socket_address_t master{};
    if (steps < 1 || !parse_address(argc > 2 ? argv[2] : "127.0.0.1:48148", master)) {
        std::fprintf(stderr, "usage: %s [STEPS [MASTER_IP:PORT]]\n", argv[0]);
        return 2;
    }
    try {
        return run(steps, master);
    } catch (const PcclError &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
