// Counter-based normal noise shared by the CPU and CUDA kernels.
//
// The noise contract: element e of (global) chain c at SGLD step t under seed s
// gets lane (e % 4) of the four normals made from
//   Philox4x32-10(counter = {e / 4, c, t_lo, t_hi}, key = {s_lo, s_hi}).
// Every float operation below is a single IEEE-754 round-to-nearest op that no
// compiler may contract (CUDA: __f*_rn intrinsics; C++: -ffp-contract=off), so
// CPU, CUDA and the pure-torch twin (llcfast/reference/philox.py) produce the
// same bits. Constants are written as double literals cast to float because the
// twin builds them the same way (Python float -> float32).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LLC_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define LLC_HD inline
#endif

namespace llcfast {

struct U4 {
  uint32_t x, y, z, w;
};

struct F4 {
  float x, y, z, w;
};

LLC_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

LLC_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c.x, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c.z, hi1, lo1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

LLC_HD float rn_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LLC_HD float rn_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LLC_HD float rn_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LLC_HD float rn_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LLC_HD float rn_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

LLC_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
LLC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ln(u) for u = ((r >> 8) + 1) * 2^-24, u in (0, 1]. Written out rather than
// calling logf because libm and CUDA's logf round differently.
LLC_HD float log_unit(uint32_t r) {
  const float k = static_cast<float>((r >> 8) + 1u);  // exact: k <= 2^24
  const uint32_t bits = float_bits(k);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  float m = bits_float((bits & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  if (m > static_cast<float>(1.4142135623730951)) {
    m = rn_mul(m, 0.5f);
    e += 1;
  }
  // ln m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172: the series to s^9 is
  // accurate to ~1e-9, below float resolution.
  const float s = rn_div(rn_sub(m, 1.0f), rn_add(m, 1.0f));
  const float z = rn_mul(s, s);
  float p = static_cast<float>(0.1111111111111111);
  p = rn_add(static_cast<float>(0.14285714285714285), rn_mul(z, p));
  p = rn_add(static_cast<float>(0.2), rn_mul(z, p));
  p = rn_add(static_cast<float>(0.3333333333333333), rn_mul(z, p));
  const float t = rn_mul(s, 2.0f);
  const float log_m = rn_add(t, rn_mul(rn_mul(t, z), p));
  return rn_add(rn_mul(static_cast<float>(e - 24), static_cast<float>(0.6931471805599453)), log_m);
}

// (cos, sin) of 2*pi*r/2^32, reduced to |phi| <= pi/4 around a quadrant q.
LLC_HD void cos_sin_turn(uint32_t r, float& c, float& s) {
  const uint32_t q = ((r + 0x20000000u) >> 30) & 3u;
  const int32_t d = static_cast<int32_t>(r - (q << 30));  // [-2^29, 2^29)
  const float phi = rn_mul(static_cast<float>(d >> 6), static_cast<float>(9.362675707309822e-08));  // 2pi/2^26
  const float z = rn_mul(phi, phi);
  float ps = static_cast<float>(2.7557319223985893e-06);  // 1/9!
  ps = rn_add(static_cast<float>(-0.0001984126984126984), rn_mul(z, ps));
  ps = rn_add(static_cast<float>(0.008333333333333333), rn_mul(z, ps));
  ps = rn_add(static_cast<float>(-0.16666666666666666), rn_mul(z, ps));
  const float sp = rn_add(phi, rn_mul(rn_mul(phi, z), ps));
  float pc = static_cast<float>(-2.755731922398589e-07);  // -1/10!
  pc = rn_add(static_cast<float>(2.48015873015873e-05), rn_mul(z, pc));
  pc = rn_add(static_cast<float>(-0.001388888888888889), rn_mul(z, pc));
  pc = rn_add(static_cast<float>(0.041666666666666664), rn_mul(z, pc));
  pc = rn_add(-0.5f, rn_mul(z, pc));
  const float cp = rn_add(1.0f, rn_mul(z, pc));
  switch (q) {
    case 0: c = cp; s = sp; break;
    case 1: c = -sp; s = cp; break;
    case 2: c = -cp; s = -sp; break;
    default: c = sp; s = -cp; break;
  }
}

// Box-Muller on two 32-bit words: two independent standard normals.
LLC_HD void box_muller(uint32_t r_radius, uint32_t r_angle, float& n0, float& n1) {
  const float radius = rn_sqrt(rn_mul(-2.0f, log_unit(r_radius)));
  float c, s;
  cos_sin_turn(r_angle, c, s);
  n0 = rn_mul(radius, c);
  n1 = rn_mul(radius, s);
}

// The four normals of one noise group (elements 4*group .. 4*group+3).
LLC_HD F4 normal4(uint64_t seed, uint32_t group, uint32_t chain, uint64_t step) {
  const U4 r = philox4x32_10(
      U4{group, chain, static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  F4 out;
  box_muller(r.x, r.y, out.x, out.y);
  box_muller(r.z, r.w, out.z, out.w);
  return out;
}

// Four Rademacher signs (+1/-1) of one probe group. Bit 31 of the last
// counter word is set: SGLD steps are < 2^63, so probe counters never meet
// noise counters. Each sign is the top bit of one Philox word.
LLC_HD F4 rademacher4(uint64_t seed, uint32_t group, uint32_t row, uint64_t stream) {
  const U4 r = philox4x32_10(
      U4{group, row, static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32) | 0x80000000u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return F4{(r.x >> 31) ? -1.0f : 1.0f, (r.y >> 31) ? -1.0f : 1.0f, (r.z >> 31) ? -1.0f : 1.0f,
            (r.w >> 31) ? -1.0f : 1.0f};
}

}  // namespace llcfast
