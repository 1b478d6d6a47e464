// The autograd of every per-layer op (`<format>_<primitive>` of csrc/ops.cpp) in C++, registered for
// the Autograd key: a call records one torch::autograd::Function node instead of going through
// Python (sparseode/ops/library.py keeps the same formulas in Python for a build without this
// extension; a test checks that both give the same first and second derivatives).
//
// Every backward is written with the ops themselves, called through the dispatcher, so it is
// itself differentiable (double backward) and runs on whatever kernel the op has for the device:
//   spmm    y = act(x W^T + b):  dx = spmm_t(dy', W), dW = sddmm(dy', x), db = sum(dy'),
//           dy' = dy * act'(y); spmm_fm the same feature-major, act' on the first act_cols columns
//   spmm_t  z = g W:             dg = spmm(dz, W),     dW = sddmm(g, dz)
//   sddmm   v = P o (a^T c):     da = spmm(c, V),      dc = spmm_t(a, V), V the weight of dv
// One boxed kernel serves every op: the op's name says its format and primitive, the pattern is
// the run of tensors between the operands and the epilogue arguments.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>
#include <unordered_map>

namespace sparseode::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Primitive { Spmm, SpmmFm, SpmmT, Sddmm };

// The three ops of one format that the formulas call.
struct Family {
  c10::OperatorHandle spmm, spmm_t, sddmm;
};

const Family& family_of(const std::string& format) {
  static std::unordered_map<std::string, Family> families;
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  auto it = families.find(format);
  if (it == families.end()) {
    auto& d = c10::Dispatcher::singleton();
    auto find = [&](const char* prim) { return d.findSchemaOrThrow(("sparseode::" + format + prim).c_str(), ""); };
    it = families.emplace(format, Family{find("_spmm"), find("_spmm_t"), find("_sddmm")}).first;
  }
  return it->second;
}

Tensor call(const c10::OperatorHandle& op, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::move(args));
  op.callBoxed(stack);
  return stack.back().toTensor();
}

std::vector<c10::IValue> with_pattern(std::initializer_list<c10::IValue> head, const std::vector<Tensor>& pattern,
                                      std::initializer_list<c10::IValue> tail = {}) {
  std::vector<c10::IValue> args(head);
  args.insert(args.end(), pattern.begin(), pattern.end());
  args.insert(args.end(), tail);
  return args;
}

// act'(pre) from the output y = act(pre) (sparseode/activations.py GRADS_FROM_OUTPUT); undefined
// for identity. Written with differentiable ATen ops, so the double backward sees through it.
Tensor activation_grad(const std::string& activation, const Tensor& y) {
  if (activation == "identity") return Tensor();
  if (activation == "tanh") return 1 - y * y;
  if (activation == "relu") return (y > 0).to(y.scalar_type());
  if (activation == "softplus") return -at::expm1(-y);
  if (activation == "sigmoid") return y * (1 - y);
  if (activation == "elu") return at::where(y > 0, at::ones_like(y), y + 1);
  TORCH_CHECK(false, "activation must be one of identity, tanh, relu, softplus, sigmoid, elu; got '", activation, "'");
}

// spmm and spmm_fm: act_cols < 0 marks the batch-major op.
struct SpmmFunction : public torch::autograd::Function<SpmmFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values, std::vector<Tensor> pattern,
                        const c10::optional<Tensor>& bias, std::string activation, int64_t act_cols,
                        const c10::OperatorHandle* op, std::string format) {
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<c10::IValue> tail{bias, activation};
      if (act_cols >= 0) tail.emplace_back(act_cols);
      auto args = with_pattern({x, values}, pattern, {});
      args.insert(args.end(), tail.begin(), tail.end());
      y = call(*op, std::move(args));
    }
    const bool keep_y = activation != "identity";
    ctx->save_for_backward({x, values, keep_y ? y : Tensor()});
    ctx->saved_data["pattern"] = pattern;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["act_cols"] = act_cols;
    ctx->saved_data["format"] = format;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &y = saved[2];
    const auto pattern = ctx->saved_data["pattern"].toTensorVector();
    const auto activation = ctx->saved_data["activation"].toStringRef();
    const int64_t k = ctx->saved_data["act_cols"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Family& ops = family_of(ctx->saved_data["format"].toStringRef());
    Tensor grad = grads[0];
    const Tensor act = y.defined() ? activation_grad(activation, k >= 0 ? y.slice(1, 0, k) : y) : Tensor();
    Tensor gx, gv, gb;
    if (k < 0) {  // batch-major (B, N)
      if (act.defined()) grad = grad * act;
      if (ctx->needs_input_grad(0)) gx = call(ops.spmm_t, with_pattern({grad, values}, pattern));
      if (ctx->needs_input_grad(1)) gv = call(ops.sddmm, with_pattern({grad, x}, pattern));
      if (has_bias && ctx->needs_input_grad(2)) gb = grad.sum(0);
    } else {  // feature-major (N, B), act' on the first k columns only
      if (act.defined() && k > 0) grad = at::cat({grad.slice(1, 0, k) * act, grad.slice(1, k)}, 1);
      if (ctx->needs_input_grad(0)) gx = call(ops.spmm_t, with_pattern({grad.t(), values}, pattern)).t();
      if (ctx->needs_input_grad(1)) gv = call(ops.sddmm, with_pattern({grad.t(), x.t()}, pattern));
      if (has_bias && ctx->needs_input_grad(2)) gb = grad.slice(1, 0, k).sum(1);
    }
    return {gx, gv, Tensor(), gb, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// spmm_t (first = g, second = values) and sddmm (first = a, second = c).
struct PairFunction : public torch::autograd::Function<PairFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& first, const Tensor& second, std::vector<Tensor> pattern,
                        bool is_sddmm, const c10::OperatorHandle* op, std::string format) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = call(*op, with_pattern({first, second}, pattern));
    }
    ctx->save_for_backward({first, second});
    ctx->saved_data["pattern"] = pattern;
    ctx->saved_data["is_sddmm"] = is_sddmm;
    ctx->saved_data["format"] = format;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto pattern = ctx->saved_data["pattern"].toTensorVector();
    const Family& ops = family_of(ctx->saved_data["format"].toStringRef());
    const Tensor& grad = grads[0];
    const c10::IValue none, identity(std::string("identity"));
    Tensor g0, g1;
    if (!ctx->saved_data["is_sddmm"].toBool()) {  // z = g W
      const Tensor &g = saved[0], &values = saved[1];
      if (ctx->needs_input_grad(0)) g0 = call(ops.spmm, with_pattern({grad, values}, pattern, {none, identity}));
      if (ctx->needs_input_grad(1)) g1 = call(ops.sddmm, with_pattern({g, grad}, pattern));
    } else {  // v = P o (a^T c)
      const Tensor &a = saved[0], &c = saved[1];
      if (ctx->needs_input_grad(0)) g0 = call(ops.spmm, with_pattern({c, grad}, pattern, {none, identity}));
      if (ctx->needs_input_grad(1)) g1 = call(ops.spmm_t, with_pattern({a, grad}, pattern));
    }
    return {g0, g1, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// "sparseode::csr_spmm_fm" -> ("csr", SpmmFm)
std::pair<std::string, Primitive> parse(const std::string& name) {
  static const std::array<std::pair<const char*, Primitive>, 4> suffixes{{
      {"_spmm_fm", Primitive::SpmmFm}, {"_spmm_t", Primitive::SpmmT}, {"_sddmm", Primitive::Sddmm},
      {"_spmm", Primitive::Spmm}}};
  const std::string bare = name.substr(name.find("::") + 2);
  for (const auto& [suffix, prim] : suffixes) {
    const std::string s(suffix);
    if (bare.size() > s.size() && bare.compare(bare.size() - s.size(), s.size(), s) == 0)
      return {bare.substr(0, bare.size() - s.size()), prim};
  }
  TORCH_CHECK(false, "sparseode autograd: ", name, " is not a <format>_<primitive> op");
}

// True when autograd would record the call: grad mode on and a tensor argument requiring grad. A
// forward-mode tangent (torch.autograd.forward_ad) is refused: the ops have no forward formula
// (the fields carry tangents as extra columns of spmm_fm instead), and dropping it would be wrong.
bool records(const c10::OperatorHandle& op, const torch::jit::Stack& stack, size_t n_args) {
  bool any = false;
  for (size_t i = stack.size() - n_args; i < stack.size(); ++i) {
    if (!stack[i].isTensor()) continue;
    const Tensor& t = stack[i].toTensor();
    TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), op.schema().name(), ": argument ",
                op.schema().arguments()[i - (stack.size() - n_args)].name(),
                " carries a forward-mode tangent, and sparseode's ops have no forward-mode AD "
                "formula (feature-major spmm_fm takes tangent directions as extra columns)");
    any = any || t.requires_grad();
  }
  return any && at::GradMode::is_enabled();
}

void autograd_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  if (!records(op, *stack, n_args)) {  // inference: straight to the kernel, no node, nothing saved
    at::AutoDispatchBelowADInplaceOrView below;
    op.callBoxed(*stack);
    return;
  }
  const auto [format, prim] = parse(schema.name());
  auto args = torch::jit::pop(*stack, n_args);
  const size_t n_tail = prim == Primitive::Spmm ? 2 : prim == Primitive::SpmmFm ? 3 : 0;
  std::vector<Tensor> pattern;
  for (size_t i = 2; i < n_args - n_tail; ++i) pattern.push_back(args[i].toTensor());
  Tensor out;
  if (n_tail) {
    const size_t t = n_args - n_tail;
    const int64_t act_cols = prim == Primitive::SpmmFm ? args[t + 2].toInt() : -1;
    out = SpmmFunction::apply(args[0].toTensor(), args[1].toTensor(), std::move(pattern),
                              args[t].toOptional<Tensor>(), args[t + 1].toStringRef(), act_cols, &op, format);
  } else {
    out = PairFunction::apply(args[0].toTensor(), args[1].toTensor(), std::move(pattern),
                              prim == Primitive::Sddmm, &op, format);
  }
  torch::jit::push(*stack, std::move(out));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseode, Autograd, m) {
  for (const char* format : {"masked", "csr", "bsr"}) {
    for (const char* prim : {"spmm", "spmm_fm", "spmm_t", "sddmm"}) {
      const std::string name = std::string(format) + "_" + prim;
      m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>());
    }
  }
}

}  // namespace sparseode::autograd
