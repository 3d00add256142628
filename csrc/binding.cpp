// Torch binding of the CUDA prompted-attention kernels: checks the tensors, fills the
// plain AttnParams block (attn_params.h) and launches on the current stream.  The ops are
// registered with TORCH_LIBRARY as avstfp_cuda::fwd and avstfp_cuda::bwd (fake
// implementations for torch.compile are registered from Python, ops/cuda_backend.py).
// This is the only file that includes torch headers.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <string>
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

// One operand to describe: a tensor (*batch, rows, cols) already broadcast to the batch.
struct Item {
    const char* name;
    Tensor t;
    Operand* op;
    bool loaded;   // read by the kernels through 16-byte vector loads when allowed
    bool f32;      // a float32 prompt-grad buffer (else the dtype of q)
};

void check_operand(const Item& it, const Tensor& q, at::IntArrayRef batch, int64_t cols,
                   at::ScalarType dtype) {
    const Tensor& t = it.t;
    TORCH_CHECK(t.is_cuda(), "avstfp_cuda: ", it.name, " must be a CUDA tensor, got device ",
                t.device());
    TORCH_CHECK(t.device() == q.device(), "avstfp_cuda: ", it.name, " is on ", t.device(),
                " but q is on ", q.device());
    TORCH_CHECK(t.scalar_type() == dtype, "avstfp_cuda: ", it.name, " must have dtype ",
                dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == (int64_t)batch.size() + 2, "avstfp_cuda: ", it.name,
                " must have shape (*batch, L, ", cols, ") with batch ", batch, ", got ",
                shape_str(t));
    TORCH_CHECK(t.sizes().slice(0, batch.size()) == batch, "avstfp_cuda: ", it.name,
                " batch dims ", shape_str(t), " do not match q's batch ", batch);
    TORCH_CHECK(t.size(-1) == cols, "avstfp_cuda: ", it.name, " last dim must be ", cols,
                ", got shape ", shape_str(t));
    TORCH_CHECK(t.stride(-1) == 1, "avstfp_cuda: ", it.name,
                " must be dense in its last dim (stride 1), got strides ", t.strides());
}

// Merge batch dims that every operand can address as one (stride[i] == stride[i+1] *
// size[i+1] for all), drop size-1 dims, then fill sizes (padded to 4 at the front) and
// each operand's batch strides and row stride.
void fill_batch(AttnParams& p, at::IntArrayRef batch, std::vector<Item>& items) {
    const size_t nb = batch.size();
    std::vector<int64_t> gsize;
    std::vector<std::vector<int64_t>> gstride(items.size());
    for (size_t d = 0; d < nb; ++d) {
        if (batch[d] == 1) continue;
        bool merge = !gsize.empty();
        for (size_t i = 0; merge && i < items.size(); ++i)
            merge = gstride[i].back() == items[i].t.stride(d) * batch[d];
        if (merge) {
            gsize.back() *= batch[d];
            for (size_t i = 0; i < items.size(); ++i) gstride[i].back() = items[i].t.stride(d);
        } else {
            gsize.push_back(batch[d]);
            for (size_t i = 0; i < items.size(); ++i) gstride[i].push_back(items[i].t.stride(d));
        }
    }
    TORCH_CHECK(gsize.size() <= AVSTFP_MAX_BDIMS, "avstfp_cuda: the batch dims ", batch,
                " need ", gsize.size(), " separate strides after merging; at most ",
                AVSTFP_MAX_BDIMS, " are supported");
    const size_t pad = AVSTFP_MAX_BDIMS - gsize.size();
    int64_t nseq = 1;
    for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d) {
        p.bsize[d] = d < (int)pad ? 1 : gsize[d - pad];
        nseq *= p.bsize[d];
    }
    p.nseq = 1;
    for (int64_t s : batch) p.nseq *= s;
    TORCH_CHECK(p.nseq == nseq, "avstfp_cuda: internal error while merging batch dims");
    for (size_t i = 0; i < items.size(); ++i) {
        Operand& op = *items[i].op;
        op.ptr = items[i].t.data_ptr();
        for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d)
            op.bstride[d] = d < (int)pad ? 0 : gstride[i][d - pad];
        op.rstride = items[i].t.size(-2) <= 1 ? 0 : items[i].t.stride(-2);
    }
}

// loaded: the operands read through 16-byte loads (q, k, v, prompts, dout); else the
// outputs written through 16-byte stores (out, dq, dk, dv; not the fp32 prompt grads).
bool vec16_ok(const std::vector<Item>& items, int64_t elsize, bool loaded) {
    for (const Item& it : items) {
        if (it.loaded != loaded || it.f32) continue;
        const Operand& op = *it.op;
        if (reinterpret_cast<uintptr_t>(op.ptr) % 16) return false;
        for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d)
            if ((op.bstride[d] * elsize) % 16) return false;
        if ((op.rstride * elsize) % 16) return false;
    }
    return true;
}

// Common part of fwd/bwd: q/k/v, segments, prompts.
std::vector<Item> setup(AttnParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                        const c10::List<std::optional<Tensor>>& prompt_k,
                        const c10::List<std::optional<Tensor>>& prompt_v,
                        at::IntArrayRef q_segments, at::IntArrayRef k_segments, double scale) {
    std::memset(&p, 0, sizeof(p));
    TORCH_CHECK(q.is_cuda(), "avstfp_cuda: q must be a CUDA tensor, got device ", q.device());
    const int code = dtype_code(q.scalar_type());
    TORCH_CHECK(code >= 0, "avstfp_cuda: dtype ", q.scalar_type(),
                " is not supported; expected float16, bfloat16 or float32");
    TORCH_CHECK(q.dim() >= 2, "avstfp_cuda: q must be (*batch, Lq, E), got ", shape_str(q));
    const int64_t E = q.size(-1);
    TORCH_CHECK(E == 32 || E == 64 || E == 128, "avstfp_cuda: head dim ", E,
                " is not supported; expected 32, 64 or 128 (q ", shape_str(q), ")");
    TORCH_CHECK(v.dim() == q.dim() && v.size(-1) == E, "avstfp_cuda: v's head dim must equal "
                "q's (", E, "); q ", shape_str(q), ", v ", shape_str(v));
    int major = 0, minor = 0;
    const int dev = q.device().index();
    TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ==
                        cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) ==
                        cudaSuccess,
                "avstfp_cuda: cannot query the compute capability of ", q.device());
    TORCH_CHECK(major >= 8, "avstfp_cuda: needs compute capability >= 8.0, device ",
                q.device(), " has ", major, ".", minor);

    const at::IntArrayRef batch = q.sizes().slice(0, q.dim() - 2);
    const int64_t Lq = q.size(-2), Lk = k.size(-2);
    const int nseg = (int)q_segments.size();
    TORCH_CHECK(nseg >= 1 && nseg <= AVSTFP_MAX_SEGS && (int)k_segments.size() == nseg,
                "avstfp_cuda: 1 to ", AVSTFP_MAX_SEGS, " segments supported, got q_segments ",
                q_segments, " and k_segments ", k_segments);
    TORCH_CHECK((int)prompt_k.size() == nseg && (int)prompt_v.size() == nseg,
                "avstfp_cuda: expected one prompt entry (or None) per segment (", nseg,
                "), got ", prompt_k.size(), " and ", prompt_v.size());
    TORCH_CHECK(Lq <= INT32_MAX && Lk <= INT32_MAX, "avstfp_cuda: sequence too long");
    p.Lq = (int)Lq;
    p.nseg = nseg;
    int64_t qs = 0, ks = 0;
    for (int s = 0; s < nseg; ++s) {
        TORCH_CHECK(q_segments[s] >= 0 && k_segments[s] >= 0, "avstfp_cuda: negative segment");
        p.q_start[s] = (int)qs;
        p.q_len[s] = (int)q_segments[s];
        p.k_start[s] = (int)ks;
        p.k_len[s] = (int)k_segments[s];
        qs += q_segments[s];
        ks += k_segments[s];
    }
    TORCH_CHECK(qs == Lq && ks == Lk, "avstfp_cuda: segments ", q_segments, "/", k_segments,
                " do not sum to Lq=", Lq, " / Lk=", Lk);
    p.scale = (float)scale;
    p.head_dim = (int)E;
    p.dtype = code;
    int max_q = 0;
    for (int s = 0; s < nseg; ++s) max_q = std::max(max_q, p.q_len[s]);
    p.short_tiles = max_q <= 16 ? 1 : 0;

    std::vector<Item> items = {{"q", q, &p.q, true, false},
                               {"k", k, &p.k, true, false},
                               {"v", v, &p.v, true, false}};
    std::vector<int64_t> full(batch.begin(), batch.end());
    for (int s = 0; s < nseg; ++s) {
        const std::optional<Tensor> pk = prompt_k.get(s), pv = prompt_v.get(s);
        TORCH_CHECK(pk.has_value() == pv.has_value(), "avstfp_cuda: prompt_k[", s,
                    "] and prompt_v[", s, "] must be given together");
        if (!pk.has_value()) continue;
        const int64_t P = pk->size(-2);
        TORCH_CHECK(pv->size(-2) == P, "avstfp_cuda: prompt_v[", s, "] has ", pv->size(-2),
                    " prompts, prompt_k has ", P);
        if (P == 0) continue;
        std::vector<int64_t> shp = full;
        shp.push_back(P);
        shp.push_back(E);
        p.n_prompt[s] = (int)P;
        items.push_back({"prompt_k", pk->expand(shp), &p.pk[s], true, false});
        items.push_back({"prompt_v", pv->expand(shp), &p.pv[s], true, false});
    }
    for (int s = 0; s < nseg; ++s)
        TORCH_CHECK(p.q_len[s] == 0 || p.k_len[s] + p.n_prompt[s] > 0,
                    "avstfp_cuda: segment ", s, " has queries but no keys and no prompts");
    return items;
}

void finish(AttnParams& p, const Tensor& q, std::vector<Item>& items) {
    const at::IntArrayRef batch = q.sizes().slice(0, q.dim() - 2);
    for (const Item& it : items) {
        const int64_t cols = q.size(-1);
        check_operand(it, q, batch, cols, it.f32 ? at::kFloat : q.scalar_type());
    }
    fill_batch(p, batch, items);
    TORCH_CHECK(p.nseq <= INT32_MAX, "avstfp_cuda: ", p.nseq,
                " sequences exceed the grid limit 2^31-1");
    p.vec16 = vec16_ok(items, q.element_size(), true) ? 1 : 0;
    p.vec16_out = vec16_ok(items, q.element_size(), false) ? 1 : 0;
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

void fwd(const Tensor& q, const Tensor& k, const Tensor& v,
         const c10::List<std::optional<Tensor>>& prompt_k,
         const c10::List<std::optional<Tensor>>& prompt_v, at::IntArrayRef q_segments,
         at::IntArrayRef k_segments, double scale, const Tensor& out, const Tensor& lse) {
    AttnParams p;
    std::vector<Item> items =
        setup(p, q, k, v, prompt_k, prompt_v, q_segments, k_segments, scale);
    items.push_back({"out", out, &p.o, false, false});
    TORCH_CHECK(out.sizes() == q.sizes(), "avstfp_cuda: out must have q's shape ",
                shape_str(q), ", got ", shape_str(out));
    check_lse(lse, q, "lse");
    finish(p, q, items);
    p.lse = lse.data_ptr<float>();
    if (p.nseq == 0 || p.Lq == 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    check_launch(avstfp::launch_forward(p, stream), "fwd", p);
}

void bwd(const Tensor& q, const Tensor& k, const Tensor& v,
         const c10::List<std::optional<Tensor>>& prompt_k,
         const c10::List<std::optional<Tensor>>& prompt_v, at::IntArrayRef q_segments,
         at::IntArrayRef k_segments, double scale, const Tensor& out, const Tensor& dout,
         const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
         at::TensorList dprompt_k, at::TensorList dprompt_v, bool deterministic) {
    AttnParams p;
    std::vector<Item> items =
        setup(p, q, k, v, prompt_k, prompt_v, q_segments, k_segments, scale);
    TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() &&
                    dq.sizes() == q.sizes() && dk.sizes() == k.sizes() &&
                    dv.sizes() == v.sizes(),
                "avstfp_cuda: out/dout/dq must have q's shape ", shape_str(q),
                " and dk/dv k's/v's; got out ", shape_str(out), ", dout ", shape_str(dout),
                ", dq ", shape_str(dq), ", dk ", shape_str(dk), ", dv ", shape_str(dv));
    items.push_back({"out", out, &p.o, false, false});
    items.push_back({"dout", dout, &p.dout, true, false});
    items.push_back({"dq", dq, &p.dq, false, false});
    items.push_back({"dk", dk, &p.dk, false, false});
    items.push_back({"dv", dv, &p.dv, false, false});
    check_lse(lse, q, "lse");

    // prompt gradients: one float32 buffer per given prompt (in segment order)
    const at::IntArrayRef batch = q.sizes().slice(0, q.dim() - 2);
    size_t gi = 0;
    for (int s = 0; s < p.nseg; ++s) {
        if (!prompt_k.get(s).has_value()) continue;
        TORCH_CHECK(gi < dprompt_k.size() && gi < dprompt_v.size(),
                    "avstfp_cuda: one dprompt_k/dprompt_v buffer is needed per given prompt");
        const Tensor gk = dprompt_k[gi], gv = dprompt_v[gi];
        ++gi;
        if (p.n_prompt[s] == 0) continue;
        std::vector<int64_t> shp(batch.begin(), batch.end());
        shp.push_back(p.n_prompt[s]);
        shp.push_back(q.size(-1));
        const Tensor ek = gk.expand(shp), ev = gv.expand(shp);
        if (deterministic) {   // plain stores: each sequence must own its slice
            for (int64_t d = 0; d < (int64_t)batch.size(); ++d)
                TORCH_CHECK(batch[d] == 1 || (ek.stride(d) != 0 && ev.stride(d) != 0),
                            "avstfp_cuda: deterministic prompt-grad buffers must not be "
                            "broadcast (dim ", d, " has stride 0)");
        }
        items.push_back({"dprompt_k", ek, &p.dpk[s], false, true});
        items.push_back({"dprompt_v", ev, &p.dpv[s], false, true});
    }
    TORCH_CHECK(gi == dprompt_k.size() && gi == dprompt_v.size(),
                "avstfp_cuda: got ", dprompt_k.size(), "/", dprompt_v.size(),
                " prompt-grad buffers for ", gi, " given prompts");
    finish(p, q, items);
    p.atomic_prompt_grads = deterministic ? 0 : 1;
    p.lse = lse.data_ptr<float>();
    if (p.nseq == 0) return;
    const c10::cuda::CUDAGuard guard(q.device());
    Tensor delta = at::empty({p.nseq * (int64_t)p.Lq}, q.options().dtype(at::kFloat));
    p.delta = delta.data_ptr<float>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    check_launch(avstfp::launch_backward(p, stream), "bwd", p);
}

int64_t smem_bytes(int64_t dtype_code_, int64_t head_dim, bool short_tiles) {
    return avstfp::max_smem_bytes((int)dtype_code_, (int)head_dim, short_tiles ? 1 : 0);
}

}  // namespace

TORCH_LIBRARY(avstfp_cuda, m) {
    // the fake (meta) implementations are registered by this Python module
    m.set_python_module("avstfp_fast.ops.cuda_backend");
    m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor?[] prompt_k, Tensor?[] prompt_v, "
          "int[] q_segments, int[] k_segments, float scale, Tensor(a!) out, "
          "Tensor(b!) lse) -> ()");
    m.def("bwd(Tensor q, Tensor k, Tensor v, Tensor?[] prompt_k, Tensor?[] prompt_v, "
          "int[] q_segments, int[] k_segments, float scale, Tensor out, Tensor dout, "
          "Tensor lse, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
          "Tensor(d!)[] dprompt_k, Tensor(e!)[] dprompt_v, bool deterministic) -> ()");
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
