"""TopK kernels: the exact selection of the ``k`` largest pre-activations, and the sparse
forward/backward of a TopK transcoder's encoder and decoder used in training. Torch only.

* :func:`topk_select`: the same values as :func:`torch.topk` (indices may differ only among equal
  values), on the CPU in two stages: the maximum of each group of ``g`` features, the ``k`` best
  groups, then ``k`` of their ``k g`` members. No value outside the ``k`` groups with the largest
  maxima can be among the ``k`` largest, so the result is exact. Measured on this project's
  2-core CPU (2,048 x 1,024 float32, k = 32): 4.0 ms against 6.7 ms for ``torch.topk``
  (``benchmarks/training_step.py``).
* :class:`TopKSlots`: the features each token selected, sorted once by feature into a CSR
  ``(n_features, batch)`` matrix that every weight gradient over the same selection reuses
  (encoder and decoder: one sort, two sparse products).
* :func:`topk_encode` and :func:`sparse_decode`: autograd functions whose backward never forms a
  ``(batch, n_features)`` gradient of the weights.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

#: Two-stage selection only where it was measured faster: the CPU.
TWO_STAGE_DEVICES = ("cpu",)


def _group_size(n_features: int, k: int) -> int:
    """Features per group of the two-stage selection (1: select in one stage).

    About ``sqrt(n_features / k)`` (both stages then search about as many values), a power of
    two that divides ``n_features``, and at least 2 with ``n_features / g > k`` groups.
    """
    if k <= 0 or n_features < 4 * k:
        return 1
    g = 1 << int(math.log2(math.sqrt(n_features / k)))
    while g > 1 and n_features % g:
        g //= 2
    return g if g >= 2 and n_features // g > k else 1


def topk_select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries of each row of ``pre`` (2-D), unsorted.

    The values are those of ``pre.topk(k, dim=-1, sorted=False)`` (as a set per row); where
    several entries tie at the ``k``-th value, which of them is returned may differ. On the CPU
    the selection runs in two stages (module docstring); elsewhere it is :func:`torch.topk`.
    """
    n, n_features = pre.shape
    g = _group_size(n_features, k) if pre.device.type in TWO_STAGE_DEVICES else 1
    if g == 1:
        return pre.topk(k, dim=-1, sorted=False)
    width = n_features // g
    # group j holds features j, j + width, j + 2 width, ...: its maximum is elementwise over
    # g contiguous column blocks (no strided reduction)
    best = pre[:, :width]
    for r in range(1, g):
        best = torch.maximum(best, pre[:, r * width : (r + 1) * width])
    groups = best.topk(k, dim=-1, sorted=False).indices
    offsets = torch.arange(0, n_features, width, device=pre.device)
    candidates = (groups.unsqueeze(-1) + offsets).reshape(n, k * g)
    values, pos = pre.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, pos)


class TopKSlots:
    """The ``(batch, k)`` features selected per token, as the sparse matrix of weight gradients.

    :meth:`weight_grad` computes ``grad[i] = sum over (t, j) with indices[t, j] == i of
    values[t, j] rhs[t]`` for any ``values`` over these slots. On the CPU the slots are sorted by
    feature once (on first use) into a CSR ``(n_features, batch)`` pattern and every gradient is
    one CSR-dense product; measured (2,048 tokens, k = 32, 1,024 features, d = 128), encoder plus
    decoder weight gradients take 2.3 ms this way against 4.1 ms for two COO products, which
    sort the same indices twice. Elsewhere each gradient is :func:`encoder_weight_grad`.

    Made empty (``indices=None``) and passed to :func:`topk_encode`, it is filled with the
    selected indices there, and :func:`sparse_decode` given the same object shares the sort.
    """

    def __init__(self, n_features: int, indices: torch.Tensor | None = None):
        self.n_features = n_features
        self.indices = indices
        #: the dead features' columns when :func:`topk_encode` returned AuxK candidates dense
        #: over them (the CPU), else None
        self.aux_columns: torch.Tensor | None = None
        self._pattern: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def set(self, indices: torch.Tensor) -> None:
        """Hold ``indices`` (``(batch, k)``) from now on (and forget any AuxK columns)."""
        self.indices = indices
        self._pattern = None
        self.aux_columns = None

    def _csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order, crow, col)``: slots sorted by feature, row starts and each slot's token."""
        if self._pattern is None:
            flat = self.indices.reshape(-1)
            # the narrowest integer keys sort fastest (65,536 keys on 2 CPU threads: int16
            # 0.31 ms, int32 0.48 ms, int64 0.91 ms)
            key = torch.int16 if self.n_features <= 2**15 else torch.int32
            sorted_features, order = torch.sort(flat.to(key), stable=True)
            sorted_features = sorted_features.long()
            crow = torch.zeros(self.n_features + 1, dtype=torch.long, device=flat.device)
            crow[1:] = torch.bincount(sorted_features, minlength=self.n_features).cumsum(0)
            col = torch.div(order, self.indices.shape[-1], rounding_mode="floor")
            self._pattern = (order, crow, col)
        return self._pattern

    def csr_product(self, values: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """The sum of :meth:`weight_grad` as one CSR ``(n_features, batch)`` times ``rhs``."""
        order, crow, col = self._csr()
        vals = values.reshape(-1).to(rhs.dtype).index_select(0, order)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" (once per process)
            warnings.simplefilter("ignore", UserWarning)
            G = torch.sparse_csr_tensor(
                crow, col, vals, (self.n_features, rhs.shape[0]), check_invariants=False
            )
            return G @ rhs

    def weight_grad(self, values: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``(n_features, rhs.shape[1])``: each feature's sum of ``values``-weighted rows of ``rhs``."""
        if _csr_ok(rhs):
            return self.csr_product(values, rhs)
        return encoder_weight_grad(self.indices, values, rhs, self.n_features)

    def bias_grad(self, values: torch.Tensor) -> torch.Tensor:
        """``(n_features,)``: each feature's sum of ``values``."""
        out = torch.zeros(self.n_features, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.indices.reshape(-1), values.reshape(-1))


def _csr_ok(rhs: torch.Tensor) -> bool:
    """Whether the CSR product runs for ``rhs``: on the CPU, in float32 or float64 (torch's CPU
    CSR matmul has no bf16/fp16 kernel).
    """
    return rhs.device.type == "cpu" and rhs.dtype in (torch.float32, torch.float64)


class _TopKEncode(torch.autograd.Function):
    """TopK of ``relu(x W_enc^T + b_enc)`` whose backward touches only the selected features.

    Forward is one dense matmul and a :func:`topk_select` (on the raw pre-activations, the ReLU
    applied to the ``k`` values: the same values, without a pass over ``(batch, n_features)``);
    only ``x``, the indices and the values are kept. Backward, with ``g`` the gradient of the
    values times the ReLU mask: ``grad_x = sum_j g_j W_enc[i_j]`` (``embedding_bag``),
    ``grad_W_enc[i_j] += g_j x`` (:meth:`TopKSlots.weight_grad`) and ``grad_b_enc[i_j] += g_j``,
    so its cost is ``O(batch k d_in)`` instead of ``O(batch n_features d_in)``.

    Optionally (``dead`` given) it also returns the AuxK candidates from the same matmul: the
    ``k_aux`` largest ReLU pre-activations among the ``dead`` features (0 where fewer are
    positive), as ``(batch, k_aux)`` values and features with the same sparse backward. On the
    CPU only the dead features' columns are searched and the candidates come back dense over
    them: ``(batch, n_dead)`` values (0 outside each token's ``k_aux`` largest) and features
    (every dead feature in each row), with a dense backward over those columns; pairs of
    value 0 add nothing to the loss or gradients either way.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead, k_aux, compute_dtype, slots):
        dt = compute_dtype or x.dtype  # .to() is a no-op in x's own dtype
        pre = F.linear(x.to(dt), W_enc.to(dt), b_enc.to(dt))
        values, indices = topk_select(pre, k)
        values = values.clamp_min(0.0)  # ReLU of the k largest = k largest of the ReLU
        ctx.aux_columns = None
        if dead is not None and x.device.type == "cpu":
            # only the dead features' columns (where reading the mask costs no device sync):
            # usually a handful, so no second TopK over all features. The candidates stay
            # dense over those columns, (batch, n_dead), 0 where a column is not among a
            # token's k_aux largest, so that decoding them and their backward are small
            # matmuls: AuxK's extra cost per layer step (2,048 tokens, 1,024 features, d = 128)
            # fell from 2.9 to 1.1 ms with 3 dead features, 9.6 to 2.5 ms with 30, 21 to 5.8
            # ms with 200, against embedding_bag and sparse products over (batch, k_aux) pairs
            cols = dead.nonzero().squeeze(1)
            aux_values = pre.index_select(1, cols).relu_()
            if cols.numel() > k_aux:
                top, pos = aux_values.topk(k_aux, dim=-1, sorted=False)
                aux_values = torch.zeros_like(aux_values).scatter_(1, pos, top)
            aux_indices = cols.expand(x.shape[0], -1)
            ctx.aux_columns = cols
            if slots is not None:
                slots.aux_columns = cols
        elif dead is not None:
            aux_values, aux_indices = (
                pre.relu_().masked_fill_(~dead, 0.0).topk(k_aux, dim=-1, sorted=False)
            )
        else:
            aux_values = pre.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        values, aux_values = values.to(x.dtype), aux_values.to(x.dtype)
        ctx.slots = slots if slots is not None else TopKSlots(W_enc.shape[0])
        ctx.slots.set(indices)
        ctx.save_for_backward(x, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        x, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        g = (grad_values * (values > 0)).to(x.dtype)  # ReLU
        has_aux = aux_indices.shape[-1] > 0
        ga = (grad_aux_values * (aux_values > 0)).to(x.dtype) if has_aux else None
        if has_aux and ctx.aux_columns is not None:
            return _dense_aux_backward(ctx, x, W_enc, g, ga)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            idx, gg = indices, g
            if has_aux:
                idx, gg = torch.cat([indices, aux_indices], -1), torch.cat([g, ga], -1)
            grad_x = F.embedding_bag(idx, W_enc, per_sample_weights=gg, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = ctx.slots.weight_grad(g, x)
            if has_aux:
                grad_W = grad_W + encoder_weight_grad(aux_indices, ga, x, W_enc.shape[0])
            grad_W = grad_W.to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = ctx.slots.bias_grad(g)
            if has_aux:
                grad_b.index_add_(0, aux_indices.reshape(-1), ga.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None, None


def _dense_aux_backward(ctx, x, W_enc, g, ga):
    """:class:`_TopKEncode`'s backward when the AuxK candidates are dense over the dead
    columns ``ctx.aux_columns`` (``ga``: their gradient, ``(batch, n_dead)``).
    """
    cols = ctx.aux_columns
    grad_x = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        idx = ctx.slots.indices
        grad_x = F.embedding_bag(idx, W_enc, per_sample_weights=g, mode="sum")
        grad_x = grad_x + ga @ W_enc.index_select(0, cols)
    if ctx.needs_input_grad[1]:
        grad_W = ctx.slots.weight_grad(g, x).index_add_(0, cols, ga.T @ x).to(W_enc.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = ctx.slots.bias_grad(g).index_add_(0, cols, ga.sum(0))
    return grad_x, grad_W, grad_b, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j values_j W_dec[indices_j]`` (``embedding_bag``) with a backward through
    :class:`TopKSlots`: ``grad_W_dec`` by the slots' CSR product, ``grad_values`` as a gather
    of ``grad_y W_dec^T``. On the CPU this replaces ``embedding_bag``'s own backward (6.2 ms a
    2,048-token, 1,024-feature, d = 128 batch) by 2.0 ms (weight) + 1.6 ms (values).
    """

    @staticmethod
    def forward(ctx, values, W_dec, indices, slots):
        ctx.slots = slots
        ctx.save_for_backward(values, W_dec, indices)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_y):
        values, W_dec, indices = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = (grad_y @ W_dec.T).gather(1, indices)
        if ctx.needs_input_grad[1]:
            grad_W = ctx.slots.weight_grad(values, grad_y).to(W_dec.dtype)
        return grad_values, grad_W, None, None


#: How :func:`encoder_weight_grad` computes by default, per device type (others: ``"sparse_mm"``).
#: Chosen by measurement (``benchmarks/training_step.py``; see ``benchmarks/README.md``).
WEIGHT_GRAD_METHODS = {"cpu": "csr", "cuda": "embedding_bag"}


def encoder_weight_grad(
    indices: torch.Tensor,
    g: torch.Tensor,
    x: torch.Tensor,
    n_features: int,
    method: str | None = None,
) -> torch.Tensor:
    """``grad_W[i] = sum over (token t, slot j) with indices[t, j] == i of g[t, j] x[t]``.

    The gradient of a TopK encoder's weight from the gradient ``g`` of its ``(batch, k)`` values,
    without forming the ``(batch, n_features)`` gradient of the pre-activations. ``method``:

    * ``"sparse_mm"``: a sparse ``(n_features, batch)`` COO matrix with ``batch k`` entries times
      ``x``;
    * ``"csr"``: the slots sorted by feature into a CSR matrix (:class:`TopKSlots`) times ``x``;
    * ``"embedding_bag"``: the weight gradient of ``embedding_bag(indices, W, g)`` with ``x`` as
      its output gradient (the same sum; a sorted segment reduction on CUDA);
    * ``"dense"``: scatter ``g`` into ``(batch, n_features)`` and one matmul (in ``x``'s dtype);
    * ``None``: :data:`WEIGHT_GRAD_METHODS` for ``x``'s device (``"sparse_mm"`` instead of
      ``"csr"`` for half-precision ``x``).
    """
    if method is None:
        method = WEIGHT_GRAD_METHODS.get(x.device.type, "sparse_mm")
        if method == "csr" and not _csr_ok(x):
            method = "sparse_mm"
    n, kk = indices.shape
    if method == "sparse_mm":
        rows = torch.arange(n, device=x.device).repeat_interleave(kk)
        G = torch.sparse_coo_tensor(
            torch.stack([indices.reshape(-1), rows]),
            g.reshape(-1).to(x.dtype),
            (n_features, n),
            check_invariants=False,
        )
        return torch.sparse.mm(G, x)
    if method == "csr":
        return TopKSlots(n_features, indices).csr_product(g, x)
    if method == "embedding_bag":
        with torch.enable_grad():
            w = torch.zeros(n_features, x.shape[1], dtype=x.dtype, device=x.device)
            w.requires_grad_(True)
            out = F.embedding_bag(indices, w, per_sample_weights=g.to(x.dtype), mode="sum")
            (grad,) = torch.autograd.grad(out, w, grad_outputs=x)
        return grad
    if method == "dense":
        G = torch.zeros(n, n_features, dtype=x.dtype, device=x.device)
        G.scatter_add_(1, indices, g.to(x.dtype))
        return G.T @ x
    raise ValueError(
        f"method must be 'sparse_mm', 'csr', 'embedding_bag' or 'dense', got {method!r}."
    )


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
    slots: TopKSlots | None = None,
) -> tuple[torch.Tensor, ...]:
    """``(values, indices)`` of the ``k`` largest ``relu(x W_enc^T + b_enc)`` per row of ``x``.

    The same numbers as ``F.relu(F.linear(x, W_enc, b_enc)).topk(k, sorted=False)`` but its
    backward is sparse (see :class:`_TopKEncode`): no ``(batch, n_features)`` gradient is ever
    formed. With a boolean ``dead`` mask over features, also returns ``(aux_values,
    aux_indices)``: the ``k_aux`` largest ReLU pre-activations among dead features (AuxK).
    ``x`` may have leading dimensions; outputs are ``(..., k)``.

    ``compute_dtype`` (e.g. ``torch.bfloat16``): the matmul and the TopK selection run in that
    precision (as sparsify's encoder does under autocast on CUDA); the values come back in ``x``'s
    dtype and the backward stays in ``x``'s dtype.

    ``slots``: an empty :class:`TopKSlots` to fill with the selection, to pass on to
    :func:`sparse_decode` so that both backward passes share one sort.
    """
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    values, indices, aux_values, aux_indices = _TopKEncode.apply(
        flat, W_enc, b_enc, k, dead, k_aux, compute_dtype, slots
    )
    out = (values.reshape(*shape, -1), indices.reshape(*shape, -1))
    if dead is None:
        return out
    return *out, aux_values.reshape(*shape, -1), aux_indices.reshape(*shape, -1)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    slots: TopKSlots | None = None,
) -> torch.Tensor:
    """``sum_j values_j W_dec[indices_j] (+ b_dec)``: a gather of ``k`` decoder rows per row.

    ``embedding_bag`` forward; its backward accumulates the gradient of ``W_dec`` row by row and
    that of ``values`` is a ``(batch, k)`` gather, never a ``(batch, n_features)`` tensor. With
    ``slots`` (the :class:`TopKSlots` of ``indices``, 2-D) on the CPU, the backward is
    :class:`_SparseDecode`, which shares the slots' sorted pattern with the encoder's backward and
    computes the values' gradient from one ``(batch, n_features)`` product (measured faster
    there than ``embedding_bag``'s backward; elsewhere ``slots`` is not used).
    """
    shape = values.shape
    flat_v = values.reshape(-1, shape[-1])
    flat_i = indices.reshape(-1, shape[-1])
    if slots is not None and W_dec.device.type == "cpu":
        y = _SparseDecode.apply(flat_v, W_dec, flat_i, slots)
    else:
        y = F.embedding_bag(flat_i, W_dec, per_sample_weights=flat_v, mode="sum")
    y = y.reshape(*shape[:-1], -1)
    return y if b_dec is None else y + b_dec


# -- all layers at once ----------------------------------------------------------------------------

#: Devices where a stack's per-layer matmuls run as one batched matmul (``baddbmm``/``bmm``);
#: elsewhere as a loop of 2-D matmuls. On this project's 2-core CPU a ``baddbmm`` over 4 layers
#: (2,048 x 128 x 1,024) took 3.9 ms a layer against 1.9 ms for ``addmm``; on CUDA the batched
#: call is one kernel launch instead of one per layer (not measured here: no GPU was lent).
BATCHED_MATMUL_DEVICES = ("cuda",)


def _batched(t: torch.Tensor) -> bool:
    return t.device.type in BATCHED_MATMUL_DEVICES


def stacked_pre_activations(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(L, batch, n_features)``: ``x[l] W_enc[l]^T + b_enc[l]`` for every layer ``l``."""
    dt = dtype or x.dtype
    x, W_enc, b_enc = x.to(dt), W_enc.to(dt), b_enc.to(dt)
    if _batched(x):
        return torch.baddbmm(b_enc.unsqueeze(1), x, W_enc.transpose(1, 2))
    if torch.is_grad_enabled() and (W_enc.requires_grad or x.requires_grad):  # autograd: no out=
        return torch.stack([F.linear(x[la], W_enc[la], b_enc[la]) for la in range(x.shape[0])])
    pre = x.new_empty(x.shape[0], x.shape[1], W_enc.shape[1])
    for layer in range(x.shape[0]):
        torch.addmm(b_enc[layer], x[layer], W_enc[layer].T, out=pre[layer])
    return pre


def _stacked_values_grad(grad_y: torch.Tensor, W_dec: torch.Tensor, indices: torch.Tensor):
    """``(L, batch, k)``: ``grad_y[l] W_dec[l]^T`` at each layer's selected features."""
    if _batched(grad_y):
        return torch.bmm(grad_y, W_dec.transpose(1, 2)).gather(2, indices)
    return torch.stack(
        [(grad_y[la] @ W_dec[la].T).gather(1, indices[la]) for la in range(grad_y.shape[0])]
    )


def _offset(indices: torch.Tensor, n_features: int) -> torch.Tensor:
    """``(L, batch, k)`` per-layer feature ids as ids into the flattened ``(L n_features)``."""
    offsets = torch.arange(indices.shape[0], device=indices.device) * n_features
    return indices + offsets.view(-1, *([1] * (indices.ndim - 1)))


def _aux_candidates(pre: torch.Tensor, dead: torch.Tensor, k_aux: int):
    """AuxK candidates of every layer, ``(L, batch, m)``: the ``k_aux`` largest ReLU
    pre-activations among each layer's ``dead`` features. On the CPU only dead columns are
    searched and ``m`` is the most any layer has (a layer with fewer is padded with value 0,
    feature 0: nothing to its loss or gradients); elsewhere ``m = k_aux`` (no host sync).
    """
    L, B, n_features = pre.shape
    if pre.device.type != "cpu":
        masked = pre.relu().masked_fill_(~dead.unsqueeze(1), 0.0)
        return masked.topk(min(k_aux, n_features), dim=-1, sorted=False)
    counts = [min(k_aux, int(n)) for n in dead.sum(1).tolist()]
    m = max(counts)
    values = pre.new_zeros(L, B, m)
    indices = torch.zeros(L, B, m, dtype=torch.long, device=pre.device)
    for layer, c in enumerate(counts):
        if c == 0:
            continue
        cols = dead[layer].nonzero().squeeze(1)
        v, pos = pre[layer].index_select(1, cols).relu_().topk(c, dim=-1, sorted=False)
        values[layer, :, :c] = v
        indices[layer, :, :c] = cols[pos]
    return values, indices


class _StackedTopKEncode(torch.autograd.Function):
    """:class:`_TopKEncode` for ``L`` layers at once: ``x`` ``(L, batch, d_in)``, weights
    ``(L, n_features, d_in)`` and ``(L, n_features)``; one :func:`topk_select` over all
    layers' rows, one sort of all layers' slots (:class:`TopKSlots` over the flattened
    ``L n_features`` features and ``L batch`` tokens) for the weight gradients.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, dead, k_aux, compute_dtype, slots):
        L, B, _ = x.shape
        n_features = W_enc.shape[1]
        pre = stacked_pre_activations(x, W_enc, b_enc, compute_dtype)
        values, indices = topk_select(pre.view(L * B, n_features), k)
        values = values.clamp_min(0.0).view(L, B, k).to(x.dtype)
        indices = indices.view(L, B, k)
        if dead is not None:
            aux_values, aux_indices = _aux_candidates(pre, dead, k_aux)
            aux_values = aux_values.to(x.dtype)
        else:
            aux_values = x.new_zeros(L, B, 0)
            aux_indices = indices.new_zeros(L, B, 0)
        slots.set(_offset(indices, n_features).view(L * B, k))
        ctx.slots = slots
        ctx.save_for_backward(x, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        x, _indices, values, aux_indices, aux_values = ctx.saved_tensors
        L, B, d_in = x.shape
        n_features = ctx.slots.n_features // L
        g = (grad_values * (values > 0)).to(x.dtype)  # ReLU
        flat_x = x.reshape(L * B, d_in)
        grad_W = ctx.slots.weight_grad(g, flat_x)
        grad_b = ctx.slots.bias_grad(g)
        if aux_indices.shape[-1]:
            ga = (grad_aux_values * (aux_values > 0)).to(x.dtype)
            aux = _offset(aux_indices, n_features).view(L * B, -1)
            grad_W = grad_W + encoder_weight_grad(aux, ga.view(L * B, -1), flat_x, L * n_features)
            grad_b.index_add_(0, aux.reshape(-1), ga.reshape(-1))
        grad_W = grad_W.view(L, n_features, d_in)
        return None, grad_W, grad_b.view(L, n_features), None, None, None, None, None


class _StackedSparseDecode(torch.autograd.Function):
    """:class:`_SparseDecode` for ``L`` layers at once (``values``/``indices`` ``(L, batch, k)``,
    ``W_dec`` ``(L, n_features, d_out)``), sharing the encoder's sorted ``slots``.
    """

    @staticmethod
    def forward(ctx, values, W_dec, indices, slots):
        ctx.slots = slots
        ctx.save_for_backward(values, W_dec, indices)
        return _stacked_embedding_bag(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_y):
        values, W_dec, indices = ctx.saved_tensors
        L, B, _ = values.shape
        grad_values = _stacked_values_grad(grad_y, W_dec, indices)
        grad_W = ctx.slots.weight_grad(values, grad_y.reshape(L * B, -1))
        return grad_values, grad_W.view_as(W_dec), None, None


def stacked_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    k: int,
    *,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Every layer's TopK transcoder at once, with sparse backward: ``(y, values, indices,
    aux_y, aux_values, aux_indices)``.

    ``x`` ``(L, batch, d_in)``; ``W_enc`` ``(L, n_features, d_in)``, ``b_enc``
    ``(L, n_features)``, ``W_dec`` ``(L, n_features, d_out)``. ``y`` ``(L, batch, d_out)`` is the
    decoded output without ``b_dec``; ``values``/``indices`` ``(L, batch, k)`` hold per-layer
    feature ids. With ``dead`` (``(L, n_features)`` booleans), ``aux_*`` are the AuxK candidates
    and their decoded output (else None). The same numbers as :func:`topk_encode` and
    :func:`sparse_decode` layer by layer, up to float rounding (tested); gradients flow to the
    weights only (the inputs are activations of a frozen model).
    """
    L, n_features = W_enc.shape[:2]
    slots = TopKSlots(L * n_features)
    values, indices, aux_values, aux_indices = _StackedTopKEncode.apply(
        x, W_enc, b_enc, k, dead, k_aux, compute_dtype, slots
    )
    if W_dec.device.type == "cpu":
        y = _StackedSparseDecode.apply(values, W_dec, indices, slots)
    else:
        y = _stacked_embedding_bag(values, indices, W_dec)
    if dead is None:
        return y, values, indices, None, None, None
    if aux_values.shape[-1] == 0:  # no feature dead (or k_aux = 0): nothing to decode
        aux_y = W_dec.new_zeros(L, x.shape[1], W_dec.shape[2])
    else:
        aux_y = _stacked_embedding_bag(aux_values, aux_indices, W_dec)
    return y, values, indices, aux_y, aux_values, aux_indices


def _stacked_embedding_bag(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor):
    """``(L, batch, d_out)`` decoded by ``embedding_bag`` over the flattened decoders (autograd)."""
    L, B, k = values.shape
    n_features, d_out = W_dec.shape[1:]
    flat = _offset(indices, n_features).view(L * B, k)
    y = F.embedding_bag(
        flat,
        W_dec.reshape(L * n_features, d_out),
        per_sample_weights=values.reshape(L * B, k),
        mode="sum",
    )
    return y.view(L, B, d_out)
