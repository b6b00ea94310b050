"""The optimised paths compute what the plain ones do: MoE dispatch, attention, the AdamW step."""
import math

import pytest
import torch
import torch.nn.functional as F

from micro_diffusion.models import blocks
from micro_diffusion.models.attention import SelfAttention, attention
from micro_diffusion.models.ffn import ExpertChoiceMoE
from micro_diffusion.training.builder import build_optimizer


def moe_reference(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Expert choice written as loops over samples and experts, straight from the definition."""
    N, T, D = x.shape
    out = torch.zeros_like(x)
    for n in range(N):
        probs = (x[n] @ moe.router.weight.T).softmax(dim=-1)  # (T, E)
        for e in range(moe.num_experts):
            gate, idx = probs[:, e].topk(moe.capacity(T))  # this expert's top tokens
            hidden = F.gelu(x[n, idx] @ moe.w_in[e])  # exact GELU
            out[n].index_add_(0, idx, gate[:, None] * (hidden @ moe.w_out[e]))
    return out


def test_moe_gather_scatter_matches_the_loop_definition():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=24, hidden=40, num_experts=4, capacity_factor=2.0)
    for w in (moe.w_in, moe.w_out):
        torch.nn.init.normal_(w, std=0.2)
    x = torch.randn(3, 10, 24)
    torch.testing.assert_close(moe(x), moe_reference(moe, x), atol=1e-5, rtol=1e-5)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(dim=32, attn_dim=48, head_dim=16)
    x = torch.randn(2, 9, 32)
    q, k, v = attn.qkv(x).view(2, 9, 3, 48).unbind(2)  # 3 x (N, T, A)
    q, k = (F.layer_norm(t, (48,), eps=1e-6) for t in (q, k))  # q/k norms over all heads together
    q, k, v = (t.view(2, 9, 3, 16).transpose(1, 2) for t in (q, k, v))  # 3 x (N, H, T, d)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(16)).softmax(dim=-1)  # (N, H, T, T)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 9, 48))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("queries,keys", [(40, 40), (40, 11)])  # self- and cross-attention
def test_cpu_attention_path_matches_the_fused_kernel(dtype, tol, queries, keys):
    torch.manual_seed(0)
    q = torch.randn(2, 3, queries, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, keys, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 3, queries, 16, dtype=dtype)
    results = []
    for fn in (attention, F.scaled_dot_product_attention):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for ours, fused in zip(*results, strict=True):
        torch.testing.assert_close(ours, fused, atol=tol, rtol=tol)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_adaln_modulation_and_gating_match_the_plain_formulas(monkeypatch, autocast):
    torch.manual_seed(0)
    block = blocks.DiTBlock(dim=32, cond_dim=32, head_dim=16, moe=True, num_experts=4)
    for p in block.parameters():  # adaLN-Zero starts at zero gates: random weights exercise every term
        torch.nn.init.normal_(p, std=0.3)
    x, c, y = torch.randn(2, 12, 32, requires_grad=True), torch.randn(2, 32), torch.randn(2, 5, 32)
    results = []
    for fused in (True, False):
        if not fused:  # the formulas as the paper writes them, a product and a sum each
            monkeypatch.setattr(blocks, "modulate", lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None])
            monkeypatch.setattr(blocks, "gated_residual", lambda h, gate, out: h + gate[:, None] * out)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x, c, y)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (x, *block.parameters()))))
    tol = 3e-2 if autocast else 1e-5  # bf16 autocast: the plain gate product rounds to bf16, addcmul does not
    for ours, plain in zip(*results, strict=True):
        assert ours.dtype == plain.dtype
        torch.testing.assert_close(ours, plain, atol=tol * plain.abs().max().item(), rtol=tol)


def test_multi_tensor_adamw_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opt = {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "moe_lr_scale": 0.5}
    fast = build_optimizer(nets[0], opt, device="cpu")
    plain = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fast.defaults["foreach"] is True
    x = torch.randn(5, 8)
    for _ in range(3):
        for net, o in zip(nets, (fast, plain), strict=True):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
