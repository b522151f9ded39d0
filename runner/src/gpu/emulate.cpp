// Runs the kernels of kernels.cu on CPU threads with CUDA's execution model, for tests on hosts
// without a GPU (`emulate.rs` drives it). Each block's threads are real threads; __syncthreads
// is a barrier of the block; a warp shuffle exchanges values through the warp's slots between
// two barriers of the warp; a thread that returns leaves its barriers. Blocks run one after
// another, so a __shared__ variable (a function-local static here) belongs to the running
// block, and dynamic shared memory is one buffer per block.
//
// Protocol (stdin, binary, little-endian): kernel name (u32 length, bytes), grid x, grid y,
// block, dynamic shared bytes (u32 each), argument count (u32), then per argument a tag byte:
// 'b' u32 length + that many f32 (a buffer), 'u' u32, 'f' f32. Stdout: every buffer argument,
// in order, after the launch (u32 length + f32s).

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<double> slots;  // 32 per warp
    std::vector<float> dynamic;
};
static Block* block;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define CORRAL_EMULATE 1

static inline void __syncthreads() { block->all->arrive_and_wait(); }
static inline float* emulated_dynamic_shared() { return block->dynamic.data(); }
static inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

template <class T>
static T shfl_xor(T v, int lane_mask) {
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    double* slots = &block->slots[warp * 32];
    auto& bar = *block->warps[warp];
    slots[lane] = (double)v;
    bar.arrive_and_wait();
    T r = (T)slots[lane ^ lane_mask];
    bar.arrive_and_wait();
    return r;
}
static inline float __shfl_xor_sync(unsigned, float v, int m) { return shfl_xor<float>(v, m); }
static inline double __shfl_xor_sync(unsigned, double v, int m) { return shfl_xor<double>(v, m); }

#include "kernels.cu"

struct Arg {
    char tag;
    std::vector<float> buf;
    uint32_t u = 0;
    float f = 0;
};

static void read_exact(void* p, size_t n) {
    if (fread(p, 1, n, stdin) != n) {
        fprintf(stderr, "emulate: short input\n");
        exit(2);
    }
}
static uint32_t read_u32() {
    uint32_t v;
    read_exact(&v, 4);
    return v;
}

template <class F>
static void run(F kernel, unsigned gx, unsigned gy, unsigned threads, unsigned smem) {
    gridDim = {gx, gy, 1};
    blockDim = {threads, 1, 1};
    for (unsigned by = 0; by < gy; by++) {
        for (unsigned bx = 0; bx < gx; bx++) {
            Block b;
            b.all = std::make_unique<std::barrier<>>(threads);
            for (unsigned w = 0; w * 32 < threads; w++) {
                unsigned n = threads - w * 32 < 32 ? threads - w * 32 : 32;
                b.warps.push_back(std::make_unique<std::barrier<>>(n));
            }
            b.slots.assign(b.warps.size() * 32, 0.0);
            b.dynamic.assign(smem / 4, NAN);  // garbage, as a GPU's would be; exactly as long
            block = &b;
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < threads; t++) {
                ts.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    kernel();
                    b.all->arrive_and_drop();
                    b.warps[t / 32]->arrive_and_drop();
                });
            }
            for (auto& t : ts) t.join();
        }
    }
}

int main() {
    uint32_t len = read_u32();
    std::string name(len, '\0');
    read_exact(name.data(), len);
    unsigned gx = read_u32(), gy = read_u32(), threads = read_u32(), smem = read_u32();
    uint32_t nargs = read_u32();
    std::vector<Arg> a(nargs);
    for (auto& x : a) {
        read_exact(&x.tag, 1);
        if (x.tag == 'b') {
            x.buf.resize(read_u32());
            read_exact(x.buf.data(), x.buf.size() * 4);
        } else if (x.tag == 'u') {
            x.u = read_u32();
        } else if (x.tag == 'f') {
            read_exact(&x.f, 4);
        } else {
            fprintf(stderr, "emulate: bad tag\n");
            return 2;
        }
    }
    auto B = [&](size_t i) { return a.at(i).buf.data(); };
    auto U = [&](size_t i) { return a.at(i).u; };
    auto F = [&](size_t i) { return a.at(i).f; };
#define LAUNCH(call) run([&] { call; }, gx, gy, threads, smem)
    if (name == "matvec") LAUNCH(matvec(B(0), B(1), B(2), U(3), U(4), U(5)));
    else if (name == "matmul") LAUNCH(matmul(B(0), B(1), B(2), U(3), U(4), U(5)));
    else if (name == "rms_norm") LAUNCH(rms_norm(B(0), B(1), B(2), U(3), F(4)));
    else if (name == "add_rows") LAUNCH(add_rows(B(0), B(1), U(2), U(3)));
    else if (name == "add") LAUNCH(add(B(0), B(1), U(2)));
    else if (name == "scale") LAUNCH(scale(B(0), U(1), F(2)));
    else if (name == "round_f16_all") LAUNCH(round_f16_all(B(0), U(1)));
    else if (name == "rope") LAUNCH(rope(B(0), B(1), U(2), U(3), U(4), U(5), U(6)));
    else if (name == "gated") LAUNCH(gated(B(0), B(1), U(2), U(3)));
    else if (name == "softcap") LAUNCH(softcap(B(0), U(1), F(2)));
    else if (name == "attention")
        LAUNCH(attention(B(0), B(1), B(2), B(3), U(4), U(5), U(6), U(7), U(8), U(9), F(10), F(11),
                         U(12)));
    else {
        fprintf(stderr, "emulate: no kernel %s\n", name.c_str());
        return 2;
    }
    for (auto& x : a) {
        if (x.tag != 'b') continue;
        uint32_t n = x.buf.size();
        fwrite(&n, 4, 1, stdout);
        fwrite(x.buf.data(), 4, n, stdout);
    }
    return 0;
}
