// Epilogue activations for the CPU kernels, written as branch-free scalar code on a fixed-size
// array so that gcc/clang vectorise them (AVX2/FMA with -march=native, SSE2 otherwise).
#pragma once

#include <cmath>
#include <type_traits>

#include "../common.h"

namespace sparseode::cpu {

// tanh for float as a rational function (odd degree-13 / even degree-6 polynomial), accurate to a
// few float32 ulp; the clamp is where tanh rounds to +-1 in float32. V is float or a GCC vector of
// floats (the fused field's Vec<float>): one formula for the scalar epilogues and the vector kernels.
// Always inlined, so a vector instance takes the instruction set of the variant that calls it.
// (-Wpsabi warns that a wide vector return is compiled here without its instruction set: no copy is
// ever compiled out of line.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V>
__attribute__((always_inline)) inline V tanh_rational(V a) {
  constexpr float clamp = 7.90531110763549805f;
  const V hi = V{} + clamp;  // a constant: folded
  V x = a > clamp ? hi : a;  // NaN passes through both tests
  x = x < -clamp ? -hi : x;
  const V x2 = x * x;
  V p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  V q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const V r = p / q;
  const V mag = a < 0.0f ? -a : a;
  return mag < 4e-4f ? a : r;
}
#pragma GCC diagnostic pop

template <typename T>
inline T tanh_fast(T a) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_rational(a);
  } else {
    return std::tanh(a);
  }
}

template <typename T, Activation ACT>
inline T activate(T v) {
  if constexpr (ACT == Activation::Identity) {
    return v;
  } else if constexpr (ACT == Activation::Tanh) {
    return tanh_fast(v);
  } else if constexpr (ACT == Activation::Relu) {
    return v < T(0) ? T(0) : v;  // keeps NaN, like torch.relu
  } else if constexpr (ACT == Activation::Sigmoid) {
    return T(0.5) * tanh_fast(T(0.5) * v) + T(0.5);
  } else if constexpr (ACT == Activation::Softplus) {
    // torch's softplus (beta 1, threshold 20): log1p(exp(x)), linear past 20
    return v > T(20) ? v : std::log1p(std::exp(v));
  } else {  // Elu, alpha 1
    return v > T(0) ? v : std::expm1(v);
  }
}

// Calls f(tag) where decltype(tag)::value is the activation as a compile-time constant.
template <typename F>
inline void dispatch_activation(Activation act, F&& f) {
  using A = Activation;
  switch (act) {
    case A::Identity: f(std::integral_constant<A, A::Identity>{}); break;
    case A::Tanh: f(std::integral_constant<A, A::Tanh>{}); break;
    case A::Relu: f(std::integral_constant<A, A::Relu>{}); break;
    case A::Softplus: f(std::integral_constant<A, A::Softplus>{}); break;
    case A::Sigmoid: f(std::integral_constant<A, A::Sigmoid>{}); break;
    case A::Elu: f(std::integral_constant<A, A::Elu>{}); break;
  }
}

}  // namespace sparseode::cpu
