// Declarations of the CUDA built-ins kernels.cu uses, so that a host C++ compiler can check
// the kernels' syntax and types (every template instantiated by the extern "C" kernels) on a
// machine without the CUDA toolkit: scripts/test.sh runs
//   g++ -std=c++17 -fsyntax-only -include scripts/cuda-host-stub.h -x c++ src/backend/cuda/kernels.cu
// (with a few warning flags)
// NVRTC on the device remains the real compiler (scripts/gpu-test.sh); this catches the
// mistakes that would otherwise first show there, where one breaks every GPU path.
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n)
#define asm(...) (void)0
struct dim3 { unsigned x, y, z; };
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
float2 make_float2(float, float);
float4 make_float4(float, float, float, float);
struct int2 { int x, y; };
int2 make_int2(int, int);
struct uint4 { unsigned x, y, z, w; };
uint4 make_uint4(unsigned, unsigned, unsigned, unsigned);
struct uint2 { unsigned x, y; };
uint2 make_uint2(unsigned, unsigned);
unsigned long long __cvta_generic_to_shared(const void*);
float __shfl_xor_sync(unsigned, float, int);
int __shfl_xor_sync(unsigned, int, int);
float __shfl_sync(unsigned, float, int);
int __shfl_sync(unsigned, int, int);
float __shfl_down_sync(unsigned, float, int);
int __dp4a(int, int, int);
unsigned __byte_perm(unsigned, unsigned, unsigned);
unsigned __funnelshift_r(unsigned, unsigned, unsigned);
int __vsubss4(int, int);
float __int_as_float(int);
float __uint_as_float(unsigned);
int __float_as_int(float);
unsigned __float_as_uint(float);
int __float2int_rn(float);
float __fmul_rn(float, float);
float __fadd_rn(float, float);
float __fsub_rn(float, float);
float __fmaf_rn(float, float, float);
float __expf(float);
float rsqrtf(float);
float __fdividef(float, float);
void __syncthreads();
void __syncwarp();
int atomicAdd(int*, int);
unsigned atomicAdd(unsigned*, unsigned);
float atomicAdd(float*, float);
int min(int, int);
int max(int, int);
long long min(long long, long long);
int __popc(unsigned);
unsigned __vadd4(unsigned, unsigned);
unsigned __vsub4(unsigned, unsigned);
// The grid i-quants' tables, which backend/cuda/mod.rs writes in front of kernels.cu.
extern const unsigned long long iq2xxs_grid[256], iq2xs_grid[512], iq2s_grid[1024], iq1s_grid[2048];
extern const unsigned int iq3xxs_grid[256], iq3s_grid[512];
