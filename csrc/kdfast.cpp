// kdfast._C: the CPU backend's Python binding. Checks the calling contract of kdfast/_spec.py, picks
// the row kernel compiled for the best ISA the CPU has (runtime dispatch: the kernels of the other
// ISAs are in the binary but never run), and runs it over the rows with ATen's thread pool.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <vector>

#include "grad_pool.h"
#include "kernel_api.h"

namespace kdfast {
namespace {

RowsFn g_rows = &DEFAULT::run_rows;
LogFn g_log = &DEFAULT::log_f32;
std::string g_isa = "DEFAULT";

// Chooses the kernel for `capability` (torch.backends.cpu.get_cpu_capability(): "DEFAULT", "AVX2",
// "AVX512", ...; ATen's own choice, which honours ATEN_CPU_CAPABILITY). Returns the ISA now in use.
std::string select_isa(const std::string& capability) {
  g_rows = &DEFAULT::run_rows;
  g_log = &DEFAULT::log_f32;
  g_isa = "DEFAULT";
#if defined(KDFAST_X86)
  if (capability == "AVX512") {
    g_rows = &AVX512::run_rows;
    g_log = &AVX512::log_f32;
    g_isa = "AVX512";
  } else if (capability == "AVX2") {
    g_rows = &AVX2::run_rows;
    g_log = &AVX2::log_f32;
    g_isa = "AVX2";
  }
#endif
  return g_isa;
}

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    case at::kDouble: return DType::F64;
    default: TORCH_CHECK(false, "kdfast: ", name, " must be float32, bfloat16, float16 or float64, got ",
                         t.scalar_type());
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t C) {
  TORCH_CHECK(t.device().is_cpu(), "kdfast: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == C, "kdfast: ", name, " must be (", N, ", ",
              C, "), got ", t.sizes());
  TORCH_CHECK(C <= 1 || t.stride(1) == 1, "kdfast: ", name, " must have stride(1) == 1");
}

void check_vec(const at::Tensor& t, const char* name, int64_t N, at::ScalarType acc) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == N && t.is_contiguous() &&
                  t.scalar_type() == acc,
              "kdfast: ", name, " must be a contiguous (", N, ",) ", acc, " CPU tensor");
}

// Checks shared by both entry points; fills the student / label / weight / output fields of `a`.
// (kd_w and d_out are (N,) for one teacher, (M, N) contiguous for M teachers: the same layout.)
void check_common(KernelArgs& a, const at::Tensor& z, const std::optional<at::Tensor>& labels,
                  const at::Tensor& kd_w, const at::Tensor& ce_w, const at::Tensor& grad_scale,
                  const at::Tensor& d_out, const at::Tensor& ce_out, const std::optional<at::Tensor>& grad_z,
                  at::ScalarType acc, int64_t N, int64_t C, int64_t M = 1) {
  auto check_mn = [&](const at::Tensor& t, const char* name) {
    if (t.dim() == 1 && M == 1) return check_vec(t, name, N, acc);
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(0) == M && t.size(1) == N && t.is_contiguous() &&
                    t.scalar_type() == acc,
                "kdfast: ", name, " must be a contiguous (", M, ", ", N, ") ", acc, " CPU tensor");
  };
  check_mn(kd_w, "kd_w");
  check_vec(ce_w, "ce_w", N, acc);
  check_mn(d_out, "d_out");
  check_vec(ce_out, "ce_out", N, acc);
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.device().is_cpu(), "kdfast: grad_scale must be one CPU value");
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == N &&
                    labels->is_contiguous() && labels->device().is_cpu(),
                "kdfast: labels must be a contiguous (N,) int64 CPU tensor");
  }
  if (grad_z) {
    check_rows(*grad_z, "grad_z", N, C);
    TORCH_CHECK(grad_z->scalar_type() == z.scalar_type(), "kdfast: grad_z must have z's dtype");
  }
  if (N == 0 || C == 0) return;
  a.z = z.data_ptr();
  a.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  a.kd_w = kd_w.data_ptr();
  a.ce_w = ce_w.data_ptr();
  a.grad_scale = grad_scale.item<double>();  // a CPU tensor: no device sync
  a.d_out = d_out.data_ptr();
  a.ce_out = ce_out.data_ptr();
  a.grad_z = grad_z ? grad_z->data_ptr() : nullptr;
  a.N = N;
  a.C = C;
  a.sz = z.stride(0);
  a.sgz = grad_z ? grad_z->stride(0) : 0;
}

// Runs the selected ISA's kernel over the rows with ATen's thread pool, without the GIL.
void run(const KernelArgs& a) {
  const RowsFn fn = g_rows;
  // Rows are independent. A task should stream at least ~64K elements so that thread start-up stays
  // small next to the work; one row of a large vocabulary is already that.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(a.C, 1));
  pybind11::gil_scoped_release no_gil;
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// Fills the teacher fields of `a` (M = vs.size() teachers; grad_v[t] their gradient buffers or none)
// and the parameters. Shared by the single- and the multi-teacher entry points.
void set_teachers(KernelArgs& a, const at::Tensor& z, const std::vector<at::Tensor>& vs,
                  const std::vector<at::Tensor>& grad_v, const std::optional<at::Tensor>& zp,
                  const std::vector<double>& fparams, const std::vector<int64_t>& iparams, int64_t N, int64_t C) {
  TORCH_CHECK(fparams.size() == size_t(fparam::COUNT) && iparams.size() == size_t(iparam::COUNT), "kdfast: fparams / iparams must have ",
              int(fparam::COUNT), " / ", int(iparam::COUNT), " entries");
  const int64_t M = int64_t(vs.size());
  TORCH_CHECK(M >= 1 && M <= kMaxTeachers, "kdfast: 1 to ", kMaxTeachers, " teachers per kernel call, got ", M);
  TORCH_CHECK(grad_v.empty() || int64_t(grad_v.size()) == M, "kdfast: one grad_v per teacher or none");
  for (int64_t t = 0; t < M; ++t) {
    check_rows(vs[t], "teacher logits", N, C);
    const DType d = dtype_of(vs[t], "teacher logits");
    TORCH_CHECK(t == 0 || d == a.tv, "kdfast: every teacher must have the same dtype");
    a.tv = d;
    if (!grad_v.empty()) {
      check_rows(grad_v[t], "grad_v", N, C);
      TORCH_CHECK(grad_v[t].scalar_type() == vs[t].scalar_type(), "kdfast: grad_v must have v's dtype");
    }
  }
  TORCH_CHECK((a.tz == DType::F64) == (a.tv == DType::F64),
              "kdfast: float64 logits must not be mixed with another dtype");
  if (zp) {
    check_rows(*zp, "past student logits", N, C);
    TORCH_CHECK(zp->scalar_type() == z.scalar_type(), "kdfast: past student logits must have z's dtype");
  }
  a.M = int(M);
  for (int64_t t = 0; t < M && N > 0 && C > 0; ++t) {
    a.v[t] = vs[t].data_ptr();
    a.sv[t] = vs[t].stride(0);
    a.grad_v[t] = grad_v.empty() ? nullptr : grad_v[t].data_ptr();
    a.sgv[t] = grad_v.empty() ? 0 : grad_v[t].stride(0);
  }
  a.zp = zp && N > 0 && C > 0 ? zp->data_ptr() : nullptr;
  a.szp = zp ? zp->stride(0) : 0;
  a.ts = fparams[fparam::T_STUDENT], a.tt = fparams[fparam::T_TEACHER], a.scale = fparams[fparam::SCALE];
  a.rho = fparams[fparam::RHO], a.alpha = fparams[fparam::ALPHA], a.beta = fparams[fparam::BETA];
  const int64_t kind = iparams[iparam::KIND];
  TORCH_CHECK(kind >= int64_t(Kind::KL) && kind <= int64_t(Kind::JSD), "kdfast: unknown kernel kind ", kind,
              " for distill_forward");
  a.kind = static_cast<Kind>(kind);
  a.wttm = iparams[iparam::WTTM] != 0, a.reverse = iparams[iparam::REVERSE] != 0, a.center = iparams[iparam::CENTER] != 0;
  a.has_ce = iparams[iparam::HAS_CE] != 0;
  a.ignore_index = iparams[iparam::IGNORE_INDEX];
}

// The backend contract of kdfast/_spec.py.
void distill_forward(const at::Tensor& z, const at::Tensor& v, const std::optional<at::Tensor>& zp,
                     const std::optional<at::Tensor>& labels, const at::Tensor& kd_w, const at::Tensor& ce_w,
                     const at::Tensor& grad_scale, const at::Tensor& d_out, const at::Tensor& ce_out,
                     const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_v,
                     const std::vector<double>& fparams, const std::vector<int64_t>& iparams) {
  TORCH_CHECK(z.dim() == 2, "kdfast: student logits must be 2-D (N, C)");
  const int64_t N = z.size(0), C = z.size(1);
  check_rows(z, "student logits", N, C);
  KernelArgs a;
  a.tz = dtype_of(z, "student logits");
  std::vector<at::Tensor> gv;
  if (grad_v) gv.push_back(*grad_v);
  set_teachers(a, z, {v}, gv, zp, fparams, iparams, N, C);
  const at::ScalarType acc = a.tz == DType::F64 ? at::kDouble : at::kFloat;
  check_common(a, z, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, acc, N, C);
  if (N == 0 || C == 0) return;
  run(a);
}

// Multi-teacher (kdfast/_spec.py, multi_forward): M <= kMaxTeachers teachers `vs` (each (N, C), one
// dtype), kd_w and d_out (M, N), grad_v an (M, N, C) buffer or none; the student row is read once per
// sweep whatever M is, and grad_z holds the sum over the teachers (plus CE once).
void multi_forward(const at::Tensor& z, const std::vector<at::Tensor>& vs, const std::optional<at::Tensor>& zp,
                   const std::optional<at::Tensor>& labels, const at::Tensor& kd_w, const at::Tensor& ce_w,
                   const at::Tensor& grad_scale, const at::Tensor& d_out, const at::Tensor& ce_out,
                   const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_v,
                   const std::vector<double>& fparams, const std::vector<int64_t>& iparams) {
  TORCH_CHECK(z.dim() == 2, "kdfast: student logits must be 2-D (N, C)");
  const int64_t N = z.size(0), C = z.size(1), M = int64_t(vs.size());
  check_rows(z, "student logits", N, C);
  KernelArgs a;
  a.tz = dtype_of(z, "student logits");
  std::vector<at::Tensor> gv;
  if (grad_v) {
    TORCH_CHECK(grad_v->dim() == 3 && grad_v->size(0) == M, "kdfast: grad_v must be (M, N, C)");
    gv = grad_v->unbind(0);
  }
  set_teachers(a, z, vs, gv, zp, fparams, iparams, N, C);
  const at::ScalarType acc = a.tz == DType::F64 ? at::kDouble : at::kFloat;
  check_common(a, z, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, acc, N, C, M);
  if (N == 0 || C == 0) return;
  run(a);
}

// The two phases of kdfast/_spec.py ("Two phases"; the KL kind): the tensors are the columns
// [col0, col0 + C) of rows of `vocab` columns, the labels global class ids.
// The statistics per row of round `round` (kdfast/_spec.py stats_width), and the number of rounds.
int64_t stats_width(Kind kind, int64_t M, int round) {
  if (kind == Kind::LM || (kind == Kind::LS && round == 0)) return lmstat::COUNT + M;
  if (kind == Kind::LS) return round == 1 ? 1 + M : lsstat::COUNT + M * lsteacherstat::COUNT;
  if (kind == Kind::JSD && round == 1) return jsdstat::COUNT * M;
  return klstat::COUNT + M * klteacherstat::COUNT;
}
int stats_rounds(Kind kind) { return kind == Kind::JSD ? 2 : kind == Kind::LS ? 3 : 1; }

void set_shard(KernelArgs& a, Phase phase, int64_t M, int64_t C, int64_t col0, int64_t vocab) {
  TORCH_CHECK(a.kind != Kind::TOPK, "kdfast: no two-phase form for the top-k kind");
  TORCH_CHECK(col0 >= 0 && C >= 1 && col0 + C <= vocab, "kdfast: the shard [", col0, ", ", col0 + C,
              ") is not inside [0, vocab=", vocab, ")");
  a.phase = phase;
  a.col0 = col0;
  a.vocab = vocab;
}

void check_f64(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous() && t.sizes() == shape,
              "kdfast: ", name, " must be a contiguous float64 CPU tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes());
}

void check_labels(const std::optional<at::Tensor>& labels, int64_t N) {
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == N &&
                    labels->is_contiguous() && labels->device().is_cpu(),
                "kdfast: labels must be a contiguous (N,) int64 CPU tensor");
  }
}

// Phase 1: each row's statistics over the local columns into stats (N, KS) float64.
void stats_forward(const at::Tensor& z, const std::vector<at::Tensor>& vs, const std::optional<at::Tensor>& zp,
                   const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                   const std::vector<double>& fparams, const std::vector<int64_t>& iparams, int64_t col0,
                   int64_t vocab, int64_t round, const std::optional<at::Tensor>& gprev) {
  TORCH_CHECK(z.dim() == 2, "kdfast: student logits must be 2-D (N, C)");
  const int64_t N = z.size(0), C = z.size(1), M = int64_t(vs.size());
  check_rows(z, "student logits", N, C);
  KernelArgs a;
  a.tz = dtype_of(z, "student logits");
  set_teachers(a, z, vs, {}, zp, fparams, iparams, N, C);
  set_shard(a, Phase::STATS, M, C, col0, vocab);
  TORCH_CHECK(round >= 0 && round < stats_rounds(a.kind), "kdfast: round ", round, " out of range");
  TORCH_CHECK((round > 0) == bool(gprev), "kdfast: gprev (the earlier rounds' gathered stats) iff round > 0");
  a.round = int(round);
  a.KS = stats_width(a.kind, M, a.round);
  for (int r = 0; r < a.round; ++r) a.KG += stats_width(a.kind, M, r);
  if (gprev) {
    TORCH_CHECK(gprev->dim() == 3 && gprev->size(0) >= 1, "kdfast: gprev must be (world, N, K)");
    check_f64(*gprev, "gprev", {gprev->size(0), N, a.KG});
    a.gstats = gprev->data_ptr<double>();
    a.world = int(gprev->size(0));
  }
  check_f64(stats, "stats", {N, a.KS});
  check_labels(labels, N);
  if (N == 0) return;
  a.z = z.data_ptr();
  a.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  a.N = N;
  a.C = C;
  a.sz = z.stride(0);
  a.stats = stats.data_ptr<double>();
  run(a);
}

// Phase 2: combine every rank's statistics (gstats (world, N, KS)), write the local gradients and
// each row's loss terms as b (d_out, ce_out) + coef * log1p(sum over the ranks of part).
void finish_forward(const at::Tensor& z, const std::vector<at::Tensor>& vs, const std::optional<at::Tensor>& zp,
                    const std::optional<at::Tensor>& labels, const at::Tensor& kd_w, const at::Tensor& ce_w,
                    const at::Tensor& grad_scale, const at::Tensor& gstats, const at::Tensor& d_out,
                    const at::Tensor& ce_out, const at::Tensor& coef, const at::Tensor& part,
                    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_v,
                    const std::vector<double>& fparams, const std::vector<int64_t>& iparams, int64_t col0,
                    int64_t vocab) {
  TORCH_CHECK(z.dim() == 2, "kdfast: student logits must be 2-D (N, C)");
  const int64_t N = z.size(0), C = z.size(1), M = int64_t(vs.size());
  check_rows(z, "student logits", N, C);
  KernelArgs a;
  a.tz = dtype_of(z, "student logits");
  std::vector<at::Tensor> gv;
  if (grad_v) {
    TORCH_CHECK(grad_v->dim() == 3 && grad_v->size(0) == M, "kdfast: grad_v must be (M, N, C)");
    gv = grad_v->unbind(0);
  }
  set_teachers(a, z, vs, gv, zp, fparams, iparams, N, C);
  set_shard(a, Phase::FINISH, M, C, col0, vocab);
  for (int r = 0; r < stats_rounds(a.kind); ++r) a.KG += stats_width(a.kind, M, r);
  TORCH_CHECK(gstats.dim() == 3 && gstats.size(0) >= 1, "kdfast: gstats must be (world, N, K)");
  check_f64(gstats, "gstats", {gstats.size(0), N, a.KG});
  check_f64(coef, "coef", {M + 1, N});
  check_f64(part, "part", {M + 1, N});
  const at::ScalarType acc = a.tz == DType::F64 ? at::kDouble : at::kFloat;
  check_common(a, z, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, acc, N, C, M);
  if (N == 0) return;
  a.gstats = gstats.data_ptr<double>();
  a.world = int(gstats.size(0));
  a.coef = coef.data_ptr<double>();
  a.part = part.data_ptr<double>();
  run(a);
}

// The top-k (sparse teacher) form: the teacher is t_lp (N, k) log-probabilities in the accumulation
// dtype and t_idx (N, k) int64 classes; fparams / iparams in the topk_fparam / topk_iparam layouts
// (API: kdfast.topk_kd_loss, topk_reverse_kd_loss, topk_jsd_loss, declared in kdfast/losses.py;
// Triton kernel: kdfast/_triton/topk.py).
void topk_forward(const at::Tensor& z, const at::Tensor& t_lp, const at::Tensor& t_idx,
                  const std::optional<at::Tensor>& labels, const at::Tensor& kd_w, const at::Tensor& ce_w,
                  const at::Tensor& grad_scale, const at::Tensor& d_out, const at::Tensor& ce_out,
                  const std::optional<at::Tensor>& grad_z, const std::vector<double>& fparams,
                  const std::vector<int64_t>& iparams) {
  TORCH_CHECK(fparams.size() == size_t(topk_fparam::COUNT) && iparams.size() == size_t(topk_iparam::COUNT),
              "kdfast: topk fparams / iparams must have ", int(topk_fparam::COUNT), " / ", int(topk_iparam::COUNT),
              " entries");
  TORCH_CHECK(z.dim() == 2, "kdfast: student logits must be 2-D (N, C)");
  const int64_t N = z.size(0), C = z.size(1);
  check_rows(z, "student logits", N, C);
  KernelArgs a;
  a.tz = a.tv = dtype_of(z, "student logits");
  const at::ScalarType acc = a.tz == DType::F64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(t_lp.dim() == 2 && t_lp.size(0) == N && t_lp.scalar_type() == acc && t_lp.stride(1) == 1 &&
                  t_lp.device().is_cpu(),
              "kdfast: teacher top-k log-probabilities must be a (N, k) ", acc, " CPU tensor with stride(1) == 1");
  const int64_t K = t_lp.size(1);
  TORCH_CHECK(t_idx.dim() == 2 && t_idx.size(0) == N && t_idx.size(1) == K && t_idx.scalar_type() == at::kLong &&
                  (K <= 1 || t_idx.stride(1) == 1) && t_idx.device().is_cpu(),
              "kdfast: teacher top-k indices must be a (N, k) int64 CPU tensor with stride(1) == 1");
  check_common(a, z, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, acc, N, C);
  if (N == 0 || C == 0) return;
  a.t_lp = t_lp.data_ptr();
  a.t_idx = t_idx.data_ptr<int64_t>();
  a.K = K;
  a.stk = t_lp.stride(0);
  a.sti = t_idx.stride(0);
  a.ts = a.tt = fparams[topk_fparam::T], a.scale = fparams[topk_fparam::SCALE];
  a.kind = Kind::TOPK;
  a.renormalize = iparams[topk_iparam::RENORMALIZE] != 0, a.has_ce = iparams[topk_iparam::HAS_CE] != 0;
  a.ignore_index = iparams[topk_iparam::IGNORE_INDEX];
  a.tail = iparams[topk_iparam::TAIL] != 0;
  a.beta = fparams[topk_fparam::BETA];
  const int64_t div = iparams[topk_iparam::DIVERGENCE];
  TORCH_CHECK(div >= 0 && div <= int64_t(Divergence::JSD), "kdfast: topk divergence must be 0, 1 or 2, got ", div);
  a.divergence = Divergence(div);
  TORCH_CHECK(!(a.tail && a.renormalize), "kdfast: topk tail needs renormalize off");
  TORCH_CHECK(a.divergence == Divergence::FORWARD || a.renormalize || a.tail,
              "kdfast: topk reverse / JSD need renormalize or tail (a normalised support)");
  TORCH_CHECK(a.divergence != Divergence::JSD || (a.beta > 0.0 && a.beta < 1.0),
              "kdfast: topk JSD needs 0 < beta < 1 (the endpoints are FORWARD / REVERSE)");
  run(a);
}

// The selected ISA's vector log of a float32 tensor (for tests/test_cpu_isa.py's accuracy check).
at::Tensor vec_log(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "kdfast: vec_log needs a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  g_log(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

}  // namespace
}  // namespace kdfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast's fused CPU kernels (contract: kdfast/_spec.py)";
  m.def("distill_forward", &kdfast::distill_forward, "Fused distillation loss rows (see kdfast/_spec.py)",
        pybind11::arg("z"), pybind11::arg("v"), pybind11::arg("zp"), pybind11::arg("labels"),
        pybind11::arg("kd_w"), pybind11::arg("ce_w"), pybind11::arg("grad_scale"), pybind11::arg("d_out"),
        pybind11::arg("ce_out"), pybind11::arg("grad_z"), pybind11::arg("grad_v"), pybind11::arg("fparams"),
        pybind11::arg("iparams"));
  m.def("multi_forward", &kdfast::multi_forward, "Fused multi-teacher distillation rows (see kdfast/_spec.py)",
        pybind11::arg("z"), pybind11::arg("vs"), pybind11::arg("zp"), pybind11::arg("labels"),
        pybind11::arg("kd_w"), pybind11::arg("ce_w"), pybind11::arg("grad_scale"), pybind11::arg("d_out"),
        pybind11::arg("ce_out"), pybind11::arg("grad_z"), pybind11::arg("grad_v"), pybind11::arg("fparams"),
        pybind11::arg("iparams"));
  m.def("topk_forward", &kdfast::topk_forward, "Fused KD rows against a top-k teacher (see kdfast/_spec.py)",
        pybind11::arg("z"), pybind11::arg("t_lp"), pybind11::arg("t_idx"), pybind11::arg("labels"),
        pybind11::arg("kd_w"), pybind11::arg("ce_w"), pybind11::arg("grad_scale"), pybind11::arg("d_out"),
        pybind11::arg("ce_out"), pybind11::arg("grad_z"), pybind11::arg("fparams"), pybind11::arg("iparams"));
  m.def("stats_forward", &kdfast::stats_forward, "Phase 1 of the two-phase kernel (see kdfast/_spec.py)",
        pybind11::arg("z"), pybind11::arg("vs"), pybind11::arg("zp"), pybind11::arg("labels"), pybind11::arg("stats"),
        pybind11::arg("fparams"), pybind11::arg("iparams"), pybind11::arg("col0"), pybind11::arg("vocab"),
        pybind11::arg("round") = 0, pybind11::arg("gprev") = pybind11::none());
  m.def("finish_forward", &kdfast::finish_forward, "Phase 2 of the two-phase kernel (see kdfast/_spec.py)",
        pybind11::arg("z"), pybind11::arg("vs"), pybind11::arg("zp"), pybind11::arg("labels"),
        pybind11::arg("kd_w"), pybind11::arg("ce_w"), pybind11::arg("grad_scale"), pybind11::arg("gstats"),
        pybind11::arg("d_out"), pybind11::arg("ce_out"), pybind11::arg("coef"), pybind11::arg("part"),
        pybind11::arg("grad_z"), pybind11::arg("grad_v"), pybind11::arg("fparams"), pybind11::arg("iparams"),
        pybind11::arg("col0"), pybind11::arg("vocab"));
  m.def("select_isa", &kdfast::select_isa, "Pick the kernel ISA for a torch CPU capability name",
        pybind11::arg("capability"));
  m.def("vec_log", &kdfast::vec_log, "The kernel's vector log (float32; for its accuracy test)",
        pybind11::arg("x"));
  m.def("isa", [] { return kdfast::g_isa; }, "The ISA whose kernel runs now");
  m.def("pool_empty", [](std::vector<int64_t> sizes, const at::Tensor& like) { return kdfast::pool::empty(sizes, like); },
        "A CPU buffer (like's dtype) from the gradient pool (csrc/grad_pool.cpp)", pybind11::arg("sizes"),
        pybind11::arg("like"));
  m.def("pool_set_cap", &kdfast::pool::set_cap, "The gradient pool's bound in bytes (0: off)", pybind11::arg("bytes"));
  m.def("pool_clear", &kdfast::pool::clear, "Release the gradient pool's free blocks");
  m.def("pool_stats", &kdfast::pool::stats, "{hits, misses, evictions, free blocks, free bytes, cap}");
}
