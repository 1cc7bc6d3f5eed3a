"""H3 (Hungry Hungry Hippos), with heads of `head_dim` channels (H = d / head_dim heads).

For channel c = h * P + i (head h, index i < P = head_dim), positions t (N = d_state):

    q, k, v = W_q u + b_q, W_k u + b_k, W_v u + b_v
    k~_c(t) = sum_{j < N} S_{c,j} k_c(t - j) + Dk_c k_c(t)                    shift SSM (N-tap FIR) + skip
    s_{h,i,j}(t) = sum_{r <= t} K_h(t - r) k~_{h,i}(r) v_{h,j}(r) + D_h k~_{h,i}(t) v_{h,j}(t)   diagonal SSM
    y = W_o o + b_o,   o_{h,j}(t) = sum_i q_{h,i}(t) s_{h,i,j}(t)

with S_{c,j} = sum_{n <= N-1-j} B_{c,n} C_{c,n+j} and the S4D-Lin kernel K_h(l) = 2 Re sum_{n < N/2}
C'_{h,n} z_{h,n}^l (N/2 complex modes with their conjugates, N even), discretised bilinear (zoology's
default: z = (1 + dt A / 2) / (1 - dt A / 2), C' = B C dt / (1 - dt A / 2)) or zoh (z = exp(dt A),
C' = B C (exp(dt A) - 1) / A). K is computed in closed form at the input length, in fp32 (fp64 for
fp64 parameters), once per forward; both convolutions run through `fft_causal_conv`. Head outputs are
laid out (h, j), not the references' (j, h), so that a head stays contiguous under tensor parallelism.

Tensor parallelism: heads split; q/k/v is one column-parallel Linear with a per-head [q | k | v] layout,
the SSM parameters hold this rank's heads / channels, W_o is row-parallel. Initialisation, `train_B`
and the derivation: docs/layers.md, "H3".
"""
from __future__ import annotations

import math

import torch
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import (Mixer, column_linear_channels_first, exclude_from_weight_decay, full_then_local,
                                      row_linear_channels_first)
from neox_zoology.mixers.fftconv import fft_causal_conv
from neox_zoology.parallel import ColumnLinear, RowLinear, mark_tp_param, tp_size, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, register

DT_MIN, DT_MAX = 1e-3, 1e-1
DISCRETIZATIONS = ("bilinear", "zoh")


def _tp_param(full: torch.Tensor, local: slice, dtype) -> nn.Parameter:
    return mark_tp_param(nn.Parameter(full_then_local(full, 0, local).to(dtype)))


def shift_kernel(C: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
    """Shift-SSM taps S [d, N], S_{c,j} = sum_{n <= N-1-j} B_{c,n} C_{c,n+j} (S = C without B)."""
    if B is None:
        return C
    N = C.shape[-1]
    windows = torch.nn.functional.pad(C, (0, N - 1)).unfold(-1, N, 1)  # [d, N(j), N(n)] = C_{c, j+n}
    return torch.einsum("cjn,cn->cj", windows, B)


class DiagonalSSMKernel(nn.Module):
    """S4D-Lin kernel K [H_local, L] (see the module docstring)."""

    def __init__(self, heads: int, d_state: int, params_dtype=torch.float32, discretization: str = "bilinear",
                 train_B: bool = True):
        super().__init__()
        local, n = tp_slice(heads), d_state // 2
        self.discretization = discretization
        log_dt = torch.rand(heads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        C = torch.randn(heads, n, 2) * math.sqrt(0.5)  # real view of a unit-variance complex normal
        self.log_dt = _tp_param(log_dt, local, params_dtype)
        self.C = _tp_param(C, local, params_dtype)
        self.log_A_real = _tp_param(torch.full((heads, n), math.log(0.5)), local, params_dtype)
        self.A_imag = _tp_param(math.pi * torch.arange(n, dtype=torch.float32).expand(heads, n), local, params_dtype)
        if train_B:  # real view of B = 1 + 0i
            self.B = _tp_param(torch.stack([torch.ones(heads, n), torch.zeros(heads, n)], -1), local, params_dtype)
        else:
            self.B = None
        exclude_from_weight_decay(self)

    def discrete(self):
        """(C', log z), complex [H_local, N/2]: K(l) = 2 Re sum_n C'_n z_n^l (see the module docstring)."""
        real = torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32
        dt = self.log_dt.to(real).exp()[:, None]
        A = torch.complex(-self.log_A_real.to(real).exp(), self.A_imag.to(real))
        dtA = dt * A  # [H, N/2]
        C = torch.view_as_complex(self.C.to(real).contiguous())
        if self.B is not None:
            C = C * torch.view_as_complex(self.B.to(real).contiguous())
        if self.discretization == "zoh":
            return C * (torch.exp(dtA) - 1) / A, dtA
        return C * dt / (1 - dtA / 2), torch.log((1 + dtA / 2) / (1 - dtA / 2))  # bilinear

    def forward(self, L: int) -> torch.Tensor:
        """K [H_local, L] in fp32 (fp64 for fp64 parameters; complex arithmetic has no bf16).

        z^l is split as z^{mJ} z^j (l = mJ + j, J ~ sqrt(L)), so the Vandermonde sum becomes one real
        batched matmul [M, N] @ [N, J] per head: O(H N sqrt(L)) memory instead of O(H N L).
        """
        real = torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32
        C, log_z = self.discrete()
        dtA = log_z  # (device only)
        J = math.isqrt(max(L - 1, 0)) + 1
        M = -(-L // J)
        steps = torch.arange(max(M, J), device=dtA.device, dtype=real)
        X = C[:, None, :] * torch.exp(log_z[:, None, :] * (steps[:M, None] * J))  # [H, M, N/2]: C z^{mJ}
        W = torch.exp(log_z[:, :, None] * steps[:J])  # [H, N/2, J]: z^j
        # 2 Re(X @ W) = 2 [Re X, -Im X] @ [Re W; Im W]
        K = 2 * (torch.cat([X.real, -X.imag], -1) @ torch.cat([W.real, W.imag], 1))  # [H, M, J]
        return K.reshape(K.shape[0], M * J)[:, :L]


class H3(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, d_state: int = 64, head_dim: int = 1,
                 discretization: str = "bilinear", train_B: bool = True, **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d, dtype = config.hidden_size, config.params_dtype
        heads = d // head_dim
        self.head_dim = head_dim
        self.local_heads = heads // tp_size()
        self.qkv = ColumnLinear(d, 3 * d, config=config, init_method=config.init_method, bias=True,
                                gather_output=False)
        # shift SSM taps C: kaiming-uniform with fan_in N (nn.Conv1d-like), B = e_0
        bound = 1 / math.sqrt(d_state)
        self.shift_C = exclude_from_weight_decay(
            _tp_param(torch.empty(d, d_state).uniform_(-bound, bound), tp_slice(d), dtype))
        if train_B:
            e0 = torch.zeros(d, d_state)
            e0[:, 0] = 1
            self.shift_B = exclude_from_weight_decay(_tp_param(e0, tp_slice(d), dtype))
        else:
            self.shift_B = None
        self.D_k = _tp_param(torch.randn(d), tp_slice(d), dtype)
        self.ssm = DiagonalSSMKernel(heads, d_state, dtype, discretization, train_B)
        self.D = _tp_param(torch.randn(heads), tp_slice(heads), dtype)
        self.out_proj = RowLinear(d, d, config=config, init_method=config.init_method, bias=True,
                                  input_is_parallel=True, skip_bias_add=False)

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        s, b, _ = hidden_states.shape
        H, P = self.local_heads, self.head_dim
        qkv = column_linear_channels_first(hidden_states, self.qkv)  # [b, H * 3 * P, s]
        q, k_in, v = qkv.view(b, H, 3, P, s).unbind(2)  # each [b, H, P, s]
        k_in = k_in.reshape(b, H * P, s)
        taps = shift_kernel(self.shift_C, self.shift_B)[:, :s]
        k = fft_causal_conv(k_in, taps, skip=self.D_k)  # shift SSM + D_k k
        kv = k.view(b, H, P, 1, s) * v.view(b, H, 1, P, s)  # [b, H, P_i, P_j, s]
        state = {"k": self._shift_state(k_in), "x": self._modes(kv)} if keep_state else None
        kv = kv.reshape(b, H * P * P, s)
        # every (i, j) pair of a head shares the head's kernel and skip
        K = self.ssm(s)
        Dh = self.D
        if P > 1:
            K, Dh = K.repeat_interleave(P * P, dim=0), Dh.repeat_interleave(P * P)
        ssm_out = fft_causal_conv(kv, K, skip=Dh).view(b, H, P, P, s)  # diagonal SSM + D kv
        o = (q.unsqueeze(3) * ssm_out).sum(2) if P > 1 else q * ssm_out[:, :, 0]  # sum over i: [b, H, P_j, s]
        return row_linear_channels_first(o.reshape(b, H * P, s), self.out_proj), state

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        return self._sequence(hidden_states)[0], None

    def prefill(self, hidden_states):
        """x [s, b, d] -> (forward's output, its bias (None), the decoding state after position s - 1)."""
        y, state = self._sequence(hidden_states, keep_state=True)
        return y, None, state

    def _shift_state(self, k: torch.Tensor) -> torch.Tensor:
        """The shift SSM's last N - 1 inputs after k [b, H * P, s] (zeros before the sequence)."""
        n = self.shift_C.shape[-1] - 1
        padded = torch.nn.functional.pad(k, (n, 0))
        return padded[..., padded.shape[-1] - n:].contiguous()

    def _modes(self, kv: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """The diagonal SSM's modes after kv [b, H, P, P, s]: x_n = sum_r z_n^(s-1-r) kv(r), in closed form
        over chunks of positions (x <- z^c x + the chunk's own sum), [b, H, P, P, N/2] complex."""
        _, log_z = self.ssm.discrete()  # [H, N/2]
        b, H, P, _, s = kv.shape
        real = log_z.real.dtype
        c = max(1, min(chunk, s))
        age = torch.arange(c - 1, -1, -1, device=kv.device, dtype=real)
        mag, angle = torch.exp(log_z.real[..., None] * age), log_z.imag[..., None] * age  # z^(c-1-r), real parts
        re, im = mag * torch.cos(angle), mag * torch.sin(angle)  # kv is real: two real products
        x = torch.zeros(b, H, P, P, log_z.shape[-1], dtype=log_z.dtype, device=kv.device)
        for start in range(0, s, c):
            part = kv[..., start:start + c].to(real)
            n = part.shape[-1]  # the last chunk may be shorter: the last n powers are z^(n-1) .. z^0
            own = torch.complex(torch.einsum("bhijr,hnr->bhijn", part, re[..., c - n:]),
                                torch.einsum("bhijr,hnr->bhijn", part, im[..., c - n:]))
            x = x * torch.exp(log_z * n)[None, :, None, None] + own
        return x

    # -- decoding: the exact recurrences of both SSMs. Shift SSM: its last N - 1 inputs (an N-tap filter).
    # Diagonal SSM, per mode n: x_n(t) = z_n x_n(t-1) + kv(t), s(t) = 2 Re sum_n C'_n x_n(t) + D kv(t),
    # which unrolls to forward's convolution with K(l) = 2 Re sum_n C'_n z_n^l.
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        H, P, N = self.local_heads, self.head_dim, self.shift_C.shape[-1]
        real = torch.float64 if self.ssm.log_dt.dtype == torch.float64 else torch.float32
        cdtype = torch.complex128 if real == torch.float64 else torch.complex64
        return {"k": torch.zeros(batch, H * P, N - 1, dtype=dtype, device=device),
                "x": torch.zeros(batch, H, P, P, N // 2, dtype=cdtype, device=device)}

    def step(self, u: torch.Tensor, state: dict):
        """One position: u [b, h] -> (y [b, h], new state); equal to forward's output at that position."""
        b, H, P = u.shape[0], self.local_heads, self.head_dim
        q, k, v = self.qkv(u)[0].view(b, H, 3, P).unbind(2)  # [b, H, P]
        window = torch.cat([state["k"], k.reshape(b, H * P, 1)], -1)  # oldest first
        taps = shift_kernel(self.shift_C, self.shift_B).flip(-1).to(u.dtype)  # tap j acts on k(t - j)
        k = ((window * taps).sum(-1) + self.D_k.to(u.dtype) * k.reshape(b, H * P)).view(b, H, P)
        kv = k[..., :, None] * v[..., None, :]  # [b, H, P_i, P_j]
        C, log_z = self.ssm.discrete()  # [H, N/2]
        x = torch.exp(log_z)[None, :, None, None] * state["x"] + kv[..., None].to(state["x"].dtype)
        s = 2 * (x * C[None, :, None, None]).real.sum(-1) + self.D.to(x.real.dtype)[None, :, None, None] * kv
        o = (q[..., None] * s.to(u.dtype)).sum(2)  # sum over i: [b, H, P_j]
        y, _ = self.out_proj(o.reshape(b, H * P))
        return y, {"k": window[..., 1:], "x": x}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(shape, args):
    errors = []
    n, p, d = args["d_state"], args["head_dim"], shape.hidden_size
    if not _is_int(n) or n <= 0 or n % 2:
        errors.append(f"h3.d_state: {n!r}; use a positive even int (the diagonal SSM takes N/2 complex modes "
                      f"with their conjugates), e.g. 64")
    if not _is_int(p) or p <= 0 or d % p:
        errors.append(f"h3.head_dim: {p!r}; use a positive int that divides hidden_size {d}, e.g. 1")
    elif (d // p) % shape.tp:
        errors.append(f"h3: {d // p} heads (hidden_size {d} / head_dim {p}) do not split over model_parallel_size "
                      f"{shape.tp}; change head_dim or the TP size")
    if args["discretization"] not in DISCRETIZATIONS:
        errors.append(f"h3.discretization: {args['discretization']!r}; use 'bilinear' (the reference's) or 'zoh'")
    if not isinstance(args["train_B"], bool):
        errors.append(f"h3.train_B: {args['train_B']!r}; use true or false")
    return errors


def _flops(shape, args):
    d, L, n, p = shape.hidden_size, shape.seq_length, args["d_state"], args["head_dim"]
    heads = d // p
    f = flops.linear(d, 3 * d) + flops.linear(d, d)
    f += flops.fft_conv(d, L, kernel_len=min(n, L))  # shift SSM (an n-tap filter)
    f += flops.fft_conv(p * d, L)  # diagonal SSM on the P x P products of every head
    f += 2.0 * p * d  # the q contraction over i, a [1 x P] @ [P x P] product per head
    f += 4.0 * heads * n  # kernel generation, per position: N/2 complex multiply-adds per head
    return f


def _notices(args) -> list[str]:
    if args.dtype_name == "fp32":
        return []
    return [f"h3 under {args.dtype_name}: DeepSpeed stores every parameter in {args.dtype_name}, H3's SSM parameters "
            "included, which moves the layer's output 5-19% from an fp32 run of the same weights at L 64-512; "
            "train H3 in fp32 where fidelity to fp32 matters (README, Fast paths)"]


def _state_bytes(shape, args, seq_len):
    """Shift SSM: the last N keys per channel; diagonal SSM: N per (i, j) pair of each head (d x head_dim)."""
    d, N, P = shape.hidden_size, args["d_state"], args["head_dim"]
    return (d * N + d * P * N) * STATE_BYTES


register(
    MixerSpec(
        name="h3",
        module=H3,
        defaults={"d_state": 64, "head_dim": 1, "discretization": "bilinear", "train_B": True},
        # whole heads of head_dim channels; not num_attention_heads, which "heads" would make config check
        tp_split="channels",
        flops=_flops,
        state_bytes=_state_bytes,
        validate=_validate,
        notices=_notices,
        doc="H3: q, k, v; shift SSM on k; per-head diagonal SSM (S4D-Lin, bilinear) on k ⊗ v; gating with q",
        tp_note="H3 heads",
    )
)
