// Torch binding of the CUDA prompted-attention kernels: unpacks the launch plan computed in
// Python (avstfp_fast/ops/layout.py) into the plain AttnParams block (attn_params.h), adds
// the pointers after checking the tensors against it, and launches on the current stream.  The ops are
// registered with TORCH_LIBRARY as avstfp_cuda::fwd and avstfp_cuda::bwd (fake
// implementations for torch.compile are registered from Python, ops/cuda_backend.py).
// This is the only file that includes torch headers.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "attn_params.h"

namespace {

using at::Tensor;
using avstfp::AttnParams;
using avstfp::Operand;

std::string shape_str(const Tensor& t) {
    std::string s = "(";
    for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
    return s + (t.dim() == 1 ? ",)" : ")");
}

int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kHalf: return avstfp::kF16;
        case at::kBFloat16: return avstfp::kBF16;
        case at::kFloat: return avstfp::kF32;
        default: return -1;
    }
}

// The kernels' parameters come from the launch plan (avstfp_fast/ops/layout.py,
// LaunchPlan: merged batch sizes, operand strides, segment table; unpack_params in
// attn_params.h reads it); this file only checks the tensors against it and adds the
// pointers.  Each tensor is checked for device, dtype and a dense last dim, and the plan's
// addressing of it must stay inside its storage, so a wrong plan fails here instead of
// reading or writing out of bounds.
// Operand indices of attn_params.h's order.
enum : int { kQ = 0, kK, kV, kO, kDout, kDq, kDk, kDv, kPk = 8 };
constexpr int kPv = kPk + AVSTFP_MAX_SEGS, kDpk = kPv + AVSTFP_MAX_SEGS,
              kDpv = kDpk + AVSTFP_MAX_SEGS;

struct Bound {
    const char* name;
    const Tensor* t;   // null: absent
    int op;            // operand index (attn_params.h operand_at), or -1 (lse)
    int64_t rows;
};

void check_extent(const AttnParams& p, const Bound& b, const Operand& op, int64_t cols) {
    const Tensor& t = *b.t;
    if (p.nseq == 0 || b.rows == 0) return;
    int64_t last = (b.rows - 1) * op.rstride + cols - 1;
    for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d) last += (p.bsize[d] - 1) * op.bstride[d];
    const int64_t avail = (int64_t)t.storage().nbytes() / (int64_t)t.element_size() -
                          t.storage_offset();
    TORCH_CHECK(last < avail, "avstfp_cuda: the launch plan addresses ", b.name,
                " beyond its storage (", last + 1, " elements from its start, ", avail,
                " available); shape ", shape_str(t), ", strides ", t.strides());
}

void fill(AttnParams& p, at::IntArrayRef plan, const Tensor& q, std::vector<Bound>& bs,
          const Tensor* lse) {
    TORCH_CHECK(q.is_cuda(), "avstfp_cuda: q must be a CUDA tensor, got device ", q.device());
    TORCH_CHECK(q.dim() >= 2, "avstfp_cuda: q must be (*batch, Lq, E), got ", shape_str(q));
    const int code = dtype_code(q.scalar_type());
    TORCH_CHECK(code >= 0, "avstfp_cuda: dtype ", q.scalar_type(),
                " is not supported; expected float16, bfloat16 or float32");
    TORCH_CHECK((int64_t)plan.size() == avstfp::kPlanInts, "avstfp_cuda: the launch plan has ",
                plan.size(), " entries, expected ", avstfp::kPlanInts,
                " (avstfp_fast/ops/layout.py and csrc/attn_params.h disagree)");
    std::vector<void*> ptrs(avstfp::kNumPointers, nullptr);
    for (const Bound& b : bs)
        if (b.t != nullptr && b.op >= 0) ptrs[b.op] = b.t->data_ptr();
    if (lse != nullptr) ptrs[avstfp::kNumOperands] = lse->data_ptr();
    const char* err = avstfp::unpack_params(plan.data(), (int64_t)plan.size(), ptrs.data(), p);
    TORCH_CHECK(err == nullptr, "avstfp_cuda: ", err);
    TORCH_CHECK(p.dtype == code, "avstfp_cuda: the launch plan is for dtype code ", p.dtype,
                ", q has ", q.scalar_type());
    const int64_t E = q.size(-1);
    TORCH_CHECK(E == 32 || E == 64 || E == 128, "avstfp_cuda: head dim ", E,
                " is not supported; expected 32, 64 or 128 (q ", shape_str(q), ")");
    int64_t nseq = 1;
    for (int64_t d = 0; d + 2 < q.dim(); ++d) nseq *= q.size(d);
    TORCH_CHECK(p.head_dim == E && p.Lq == q.size(-2) && p.nseq == nseq,
                "avstfp_cuda: the launch plan (Lq ", p.Lq, ", head dim ", p.head_dim,
                ", ", p.nseq, " sequences) does not describe q ", shape_str(q));
    for (const Bound& b : bs)
        if (b.op == kK)
            TORCH_CHECK(p.k_start[p.nseg - 1] + p.k_len[p.nseg - 1] == b.t->size(-2),
                        "avstfp_cuda: the launch plan's key segments do not sum to Lk = ",
                        b.t->size(-2));
    TORCH_CHECK(p.nseq <= INT32_MAX, "avstfp_cuda: ", p.nseq,
                " sequences exceed the grid limit 2^31-1");
    for (const Bound& b : bs) {
        if (b.t == nullptr) continue;
        const Tensor& t = *b.t;
        TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "avstfp_cuda: ", b.name,
                    " must be on ", q.device(), ", got ", t.device());
        const at::ScalarType want = q.scalar_type();   // prompt grads too
        TORCH_CHECK(t.scalar_type() == want, "avstfp_cuda: ", b.name, " must have dtype ",
                    want, ", got ", t.scalar_type());
        TORCH_CHECK(t.dim() >= 1 && t.size(-1) == E && (E == 1 || t.stride(-1) == 1),
                    "avstfp_cuda: ", b.name, " must have a dense last dim of size ", E,
                    ", got shape ", shape_str(t), " strides ", t.strides());
        if (b.op >= 0) check_extent(p, b, *avstfp::operand_at(p, b.op), E);
    }
}

void add_prompts(std::vector<Bound>& bs, const c10::List<std::optional<Tensor>>& prompt_k,
                 const c10::List<std::optional<Tensor>>& prompt_v, std::deque<Tensor>& keep) {
    TORCH_CHECK(prompt_k.size() == prompt_v.size() && prompt_k.size() <= AVSTFP_MAX_SEGS,
                "avstfp_cuda: one prompt entry (or None) per segment, at most ",
                AVSTFP_MAX_SEGS, "; got ", prompt_k.size(), " and ", prompt_v.size());
    for (size_t s = 0; s < prompt_k.size(); ++s) {
        const std::optional<Tensor> pk = prompt_k.get(s), pv = prompt_v.get(s);
        TORCH_CHECK(pk.has_value() == pv.has_value(), "avstfp_cuda: prompt_k[", s,
                    "] and prompt_v[", s, "] must be given together");
        if (!pk.has_value()) continue;
        keep.push_back(*pk);
        bs.push_back({"prompt_k", &keep.back(), kPk + (int)s, pk->size(-2)});
        keep.push_back(*pv);
        bs.push_back({"prompt_v", &keep.back(), kPv + (int)s, pv->size(-2)});
    }
}

void check_launch(cudaError_t e, const char* what, const AttnParams& p) {
    TORCH_CHECK(e == cudaSuccess, "avstfp_cuda::", what, ": CUDA launch failed: ",
                cudaGetErrorString(e), " (sequences=", p.nseq, ", Lq=", p.Lq, ", head_dim=",
                p.head_dim, ", dtype code=", p.dtype, ", short_tiles=", p.short_tiles,
                ", shared memory=", avstfp::max_smem_bytes(p.dtype, p.head_dim, p.short_tiles),
                " bytes)");
}

void check_lse(const Tensor& lse, const Tensor& q, const char* name) {
    std::vector<int64_t> want(q.sizes().begin(), q.sizes().end() - 1);
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                    lse.sizes() == at::IntArrayRef(want) && lse.device() == q.device(),
                "avstfp_cuda: ", name, " must be a contiguous float32 tensor of shape ",
                at::IntArrayRef(want), " on ", q.device(), ", got ", shape_str(lse), " ",
                lse.scalar_type(), " on ", lse.device());
}

void same_shape(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
    TORCH_CHECK(a.sizes() == b.sizes(), "avstfp_cuda: ", an, " must have ", bn, "'s shape ",
                shape_str(b), ", got ", shape_str(a));
}

// The operands both ops read: q, k, v and the forward output (shape of q), with lse checked.
std::vector<Bound> qkv_out(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                           const Tensor& lse) {
    same_shape(out, "out", q, "q");
    check_lse(lse, q, "lse");
    return {{"q", &q, kQ, q.size(-2)},
            {"k", &k, kK, k.size(-2)},
            {"v", &v, kV, v.size(-2)},
            {"out", &out, kO, out.size(-2)}};
}

void fwd(const Tensor& q, const Tensor& k, const Tensor& v,
         const c10::List<std::optional<Tensor>>& prompt_k,
         const c10::List<std::optional<Tensor>>& prompt_v, at::IntArrayRef plan,
         const Tensor& out, const Tensor& lse) {
    std::vector<Bound> bs = qkv_out(q, k, v, out, lse);
    std::deque<Tensor> keep;   // stable addresses for the Bound pointers
    add_prompts(bs, prompt_k, prompt_v, keep);
    AttnParams p;
    fill(p, plan, q, bs, &lse);
    if (p.nseq == 0 || p.Lq == 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    check_launch(avstfp::launch_forward(p, stream), "fwd", p);
}

// The int32 ticket counters of the prompt-gradient reduction (attn_kernels.cuh,
// last_of_row_set), at least n: one buffer per device and stream, zeroed once when it is
// allocated or grown (one fill, on the stream, before the first launch that needs it) and
// left at 0 by every kernel, so no call fills it and CUDA-graph replays stay valid (make
// the first call before capturing).  Per stream: two backwards running at once must not
// share counters.  Kept here rather than passed in, so that a traced graph
// (torch.compile) holds no buffer of its own and adds no fill.  Never freed (a static
// tensor would be destroyed after the CUDA runtime at exit).
int* ticket_buffer(const Tensor& q, int64_t n, cudaStream_t stream) {
    static std::mutex mu;
    static auto* cache = new std::map<std::pair<int, cudaStream_t>, Tensor>();
    const std::lock_guard<std::mutex> lock(mu);
    Tensor& t = (*cache)[{(int)q.get_device(), stream}];
    if (!t.defined() || t.numel() < n)
        t = at::zeros({std::max<int64_t>({n, 1024, t.defined() ? 2 * t.numel() : 0})},
                      q.options().dtype(at::kInt));
    return t.data_ptr<int>();
}

// dprompt: one buffer (2, *lead, P, E) in the prompts' dtype per segment that has prompts
// (P > 0), in segment order: index 0 receives the gradient of prompt_k, index 1 that of
// prompt_v (layout.prompt_grad_shape: lead = the prompts' own batch shape).  scratch:
// float32, the prompt-gradient partials (attn_params.h prompt_part_offset), then delta
// (nseq * Lq) for the two-kernel backward: the backend's (ops/cuda_backend.py, sized by
// cuda_backend.launches).
void bwd(const Tensor& q, const Tensor& k, const Tensor& v,
         const c10::List<std::optional<Tensor>>& prompt_k,
         const c10::List<std::optional<Tensor>>& prompt_v, at::IntArrayRef plan,
         const Tensor& out, const Tensor& dout, const Tensor& lse, const Tensor& dq,
         const Tensor& dk, const Tensor& dv, at::TensorList dprompt, const Tensor& scratch) {
    std::vector<Bound> bs = qkv_out(q, k, v, out, lse);
    same_shape(dout, "dout", q, "q");
    same_shape(dq, "dq", q, "q");
    same_shape(dk, "dk", k, "k");
    same_shape(dv, "dv", v, "v");
    bs.insert(bs.end(), {{"dout", &dout, kDout, dout.size(-2)},
                         {"dq", &dq, kDq, dq.size(-2)},
                         {"dk", &dk, kDk, dk.size(-2)},
                         {"dv", &dv, kDv, dv.size(-2)}});
    std::deque<Tensor> keep;   // stable addresses for the Bound pointers
    add_prompts(bs, prompt_k, prompt_v, keep);
    size_t gi = 0;
    for (size_t s = 0; s < prompt_k.size(); ++s) {
        if (!prompt_k.get(s).has_value()) continue;
        TORCH_CHECK(gi < dprompt.size(), "avstfp_cuda: one dprompt buffer is needed per "
                    "segment with prompts; got ", dprompt.size());
        const Tensor& g = dprompt[gi++];
        TORCH_CHECK(g.dim() >= 3 && g.size(0) == 2, "avstfp_cuda: dprompt[", gi - 1,
                    "] must be (2, *lead, P, E), got ", shape_str(g));
        keep.push_back(g.select(0, 0));
        bs.push_back({"dprompt_k", &keep.back(), kDpk + (int)s, g.size(-2)});
        keep.push_back(g.select(0, 1));
        bs.push_back({"dprompt_v", &keep.back(), kDpv + (int)s, g.size(-2)});
    }
    TORCH_CHECK(gi == dprompt.size(), "avstfp_cuda: got ", dprompt.size(),
                " prompt-grad buffers for ", gi, " segments with prompts");
    AttnParams p;
    fill(p, plan, q, bs, &lse);
    if (p.nseq == 0) return;
    const int64_t nparts = avstfp::prompt_part_offset(p, p.nseg);
    const int64_t nticks = avstfp::prompt_ticket_offset(p, p.nseg);
    TORCH_CHECK(scratch.scalar_type() == at::kFloat && scratch.is_contiguous() &&
                    scratch.device() == q.device() && scratch.numel() >= nparts &&
                    reinterpret_cast<uintptr_t>(scratch.data_ptr()) % 16 == 0,
                "avstfp_cuda: scratch must be a contiguous, 16-byte aligned float32 tensor of "
                "at least ", nparts, " elements on ", q.device(), ", got ", shape_str(scratch),
                " ", scratch.scalar_type(), " on ", scratch.device());
    p.part = scratch.data_ptr<float>();
    // delta follows the partials where the backend sized scratch for it (the two-kernel
    // backward; launch_backward refuses that path without it)
    p.delta = scratch.numel() >= nparts + p.nseq * p.Lq ? p.part + nparts : nullptr;
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    if (nticks > 0) p.tickets = ticket_buffer(q, nticks, stream);
    check_launch(avstfp::launch_backward(p, stream), "bwd", p);
}

int64_t smem_bytes(int64_t dtype_code_, int64_t head_dim, bool short_tiles) {
    return avstfp::max_smem_bytes((int)dtype_code_, (int)head_dim, short_tiles ? 1 : 0);
}

}  // namespace

TORCH_LIBRARY(avstfp_cuda, m) {
    // the fake (meta) implementations are registered by this Python module
    m.set_python_module("avstfp_fast.ops.cuda_backend");
    // plan: avstfp_fast.ops.layout.LaunchPlan.ints() (read by attn_params.h unpack_params)
    m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor?[] prompt_k, Tensor?[] prompt_v, "
          "int[] plan, Tensor(a!) out, Tensor(b!) lse) -> ()");
    m.def("bwd(Tensor q, Tensor k, Tensor v, Tensor?[] prompt_k, Tensor?[] prompt_v, "
          "int[] plan, Tensor out, Tensor dout, Tensor lse, Tensor(a!) dq, Tensor(b!) dk, "
          "Tensor(c!) dv, Tensor(d!)[] dprompt, Tensor(e!) scratch) -> ()");
    m.def("smem_bytes(int dtype_code, int head_dim, bool short_tiles) -> int", &smem_bytes);
}

TORCH_LIBRARY_IMPL(avstfp_cuda, CUDA, m) {
    m.impl("fwd", &fwd);
    m.impl("bwd", &bwd);
}

// Importing the extension module (avstfp_fast._C) loads the library and so registers the
// ops above; the module itself exposes nothing else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "avstfp_fast CUDA kernels; the ops live in torch.ops.avstfp_cuda";
}
