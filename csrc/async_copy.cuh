// cp.async (sm_80+): 16-byte global -> shared copies that bypass the registers.
//
// A copy with `valid` false reads nothing and writes 16 zero bytes (src-size
// 0): how masked chunks (padding taps, rows past m, K past a segment) become
// the zeros the tensor cores expect. On the host (the emulator) the copy is a
// plain synchronous one, so the addressing is tested there; the asynchrony,
// commit groups and waits exist on the device only.
#pragma once

#include <cstdint>

#include "numeric.cuh"

namespace fused_resblock {

FR_HOST_DEVICE void copy_chunk_async(void* shared_dst, const void* global_src, bool valid) {
#ifdef __CUDA_ARCH__
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src),
               "r"(valid ? 16 : 0));
#else
  *static_cast<uint4*>(shared_dst) = valid ? *static_cast<const uint4*>(global_src) : make_uint4(0, 0, 0, 0);
#endif
}

// Closes the group of copies this thread issued since the last commit.
FR_HOST_DEVICE void commit_async_copies() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending>
FR_HOST_DEVICE void wait_async_copies() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

}  // namespace fused_resblock
