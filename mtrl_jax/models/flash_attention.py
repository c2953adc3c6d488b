"""Blockwise (flash) attention over packed rows as a Pallas kernel: the accelerator path of
:func:`mtrl_jax.models.transformer.attend`.

The XLA path builds a ``[B, L, L]`` mask and a ``[B, H, L, L]`` score tensor per layer. This
kernel never does: each program takes a block of queries of one head, walks the key blocks it
can see with an online softmax (running max and sum in float32), and writes the output and
the log-sum-exp. The mask is computed inside the kernel from the row's ids, the same rule as
:func:`~mtrl_jax.models.transformer.packed_mask`:

    query i sees key j  iff  j <= i,  seg[j] > 0,  and  (seg[i] == seg[j]  or  par[i] == seg[j])

where ``par`` names the shared prefix a segment continues (tree packing, 0 = none). Key blocks
that no query of the block can see are not visited: per row, the first key a query can see is
the start of its segment or of its parent (``_bounds``), so a packed row costs about the sum of
its segments' squared lengths, not the row's.

The backward is two more kernels (``dq`` per query block; ``dk, dv`` per key block and query
head, summed over the heads that share a key head afterwards) that recompute the probabilities
from the saved log-sum-exp. Grouped-query attention: query head ``h`` reads key head ``h // G``.

On CPU the kernels run in Pallas interpret mode (tests: equal to the XLA path in values and
gradients, also under the TPU interpreter, ``interpret=pltpu.InterpretParams()``); on GPU they
lower through Triton (checked by ``benchmarks/device/h200.sh`` on a lent GPU); Mosaic (TPU)
lowering is not verified.

Under a mesh of several devices (passed as ``mesh``, or the one ``jax.set_mesh`` makes current,
as :class:`~mtrl_jax.training.distributed.MeshPlacement`'s updates do) the kernel runs under
``jax.shard_map``: XLA's sharding propagation does not partition a ``pallas_call``, so without
it every device would gather the whole batch. Rows are split over the mesh's ``data`` and
``fsdp`` axes and heads over ``tensor`` (the layouts the partition rules of
:mod:`mtrl_jax.models.sharding` give q, k and v), each where it divides; attention never
crosses a row, so the shards need no communication.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

NEG = -1e30  # a masked score (finite: exp(NEG - NEG) stays defined)


def _pow2_at_least(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _bounds(seg: jax.Array, par: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row ``[L]``: ``first_key[i]``, the lowest key index query ``i`` can see, and
    ``last_query[j]``, the highest query index that can see key ``j`` (both ``i`` / ``j``
    itself for padding)."""
    n = seg.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    seg_c = jnp.clip(seg, 0, n)
    par_c = jnp.clip(par, 0, n)
    start = jnp.full((n + 1,), n, jnp.int32).at[seg_c].min(idx)
    end = jnp.full((n + 1,), -1, jnp.int32).at[seg_c].max(idx).at[par_c].max(idx)
    own = start[seg_c]
    parent = jnp.where(par_c > 0, start[par_c], n)
    first_key = jnp.where(seg > 0, jnp.minimum(own, parent), idx)
    last_query = jnp.where(seg > 0, end[seg_c], idx)
    return first_key, last_query


def _precision(dtype):
    """Float32 inputs get float32 matmuls (Triton's default for them is TF32, which would
    part from the XLA path at 1e-3); bf16 inputs the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(precision):
    return functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)


def _visible(rows, cols, seg_q, par_q, seg_k):
    return ((cols[None, :] <= rows[:, None]) & (seg_k[None, :] > 0)
            & ((seg_q[:, None] == seg_k[None, :]) | (par_q[:, None] == seg_k[None, :])))


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, par_ref, first_ref, o_ref, lse_ref, *,
                bq: int, bk: int, scale: float, precision=None):
    dot = _dot(precision)
    i = pl.program_id(2)
    q = q_ref[...]
    rows = i * bq + jnp.arange(bq)
    seg_q = seg_ref[pl.ds(i * bq, bq)]
    par_q = par_ref[pl.ds(i * bq, bq)]
    lo = jnp.min(first_ref[pl.ds(i * bq, bq)]) // bk
    hi = ((i + 1) * bq + bk - 1) // bk  # causal: no key after the block's last query

    def body(j, carry):
        acc, m, s_sum = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        cols = j * bk + jnp.arange(bk)
        mask = _visible(rows, cols, seg_q, par_q, seg_ref[pl.ds(j * bk, bk)])
        s = dot(q, k.T) * scale
        s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        s_sum = alpha * s_sum + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
        return acc, m_new, s_sum

    d = q.shape[-1]
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, s_sum = jax.lax.fori_loop(lo, hi, body, init)
    empty = s_sum == 0.0  # padding: sees nothing, writes 0
    s_safe = jnp.where(empty, 1.0, s_sum)
    o_ref[...] = (acc / s_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG, m + jnp.log(s_safe))


def _forward(q, k, v, seg, par, first, *, bq, bk, scale, interpret):
    """``q [B, H, L, D]``, ``k, v [B, KV, L, D]`` -> ``(out [B, H, L, D], lse [B, H, L])``."""
    b, h, n, d = q.shape
    groups = h // k.shape[1]
    kernel = functools.partial(_fwd_kernel, bq=bq, bk=bk, scale=scale,
                               precision=_precision(q.dtype))
    row = pl.BlockSpec((None, n), lambda bi, hi, i: (bi, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, h, n // bq),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),
            pl.BlockSpec((None, None, n, d), lambda bi, hi, i: (bi, hi // groups, 0, 0)),
            pl.BlockSpec((None, None, n, d), lambda bi, hi, i: (bi, hi // groups, 0, 0)),
            row, row, row,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
        interpret=interpret,
        name="mtrl_flash_fwd",
    )(q, k, v, seg, par, first)


# ------------------------------------------------------------------------------ backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, par_ref, first_ref,
               dq_ref, *, bq: int, bk: int, scale: float, precision=None):
    dot = _dot(precision)
    i = pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    rows = i * bq + jnp.arange(bq)
    seg_q = seg_ref[pl.ds(i * bq, bq)]
    par_q = par_ref[pl.ds(i * bq, bq)]
    lo = jnp.min(first_ref[pl.ds(i * bq, bq)]) // bk
    hi = ((i + 1) * bq + bk - 1) // bk

    def body(j, dq):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        cols = j * bk + jnp.arange(bk)
        mask = _visible(rows, cols, seg_q, par_q, seg_ref[pl.ds(j * bk, bk)])
        s = dot(q, k.T) * scale
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = dot(do, v.T)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, par_ref, last_ref,
                dk_ref, dv_ref, *, bq: int, bk: int, scale: float, precision=None):
    """One key block against the queries of one head (the heads that share a key head are
    summed afterwards: every block dimension stays a power of 2 for Triton, whatever the
    group size)."""
    dot = _dot(precision)
    j = pl.program_id(2)
    n = seg_ref.shape[0]
    k = k_ref[...]
    v = v_ref[...]
    cols = j * bk + jnp.arange(bk)
    seg_k = seg_ref[pl.ds(j * bk, bk)]
    lo = (j * bk) // bq  # causal: no query before the block's first key
    hi = jnp.minimum((jnp.max(last_ref[pl.ds(j * bk, bk)]) // bq) + 1, n // bq)

    def body(t, carry):
        dk, dv = carry
        q = q_ref[pl.ds(t * bq, bq), :]
        do = do_ref[pl.ds(t * bq, bq), :]
        lse = lse_ref[pl.ds(t * bq, bq)]
        delta = delta_ref[pl.ds(t * bq, bq)]
        rows = t * bq + jnp.arange(bq)
        mask = _visible(rows, cols, seg_ref[pl.ds(t * bq, bq)], par_ref[pl.ds(t * bq, bq)],
                        seg_k)
        s = dot(q, k.T) * scale
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + dot(p.T.astype(do.dtype), do)
        dp = dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dk = dk + dot(ds.T.astype(q.dtype), q)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo, hi, body, init)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _backward(q, k, v, out, lse, do, seg, par, first, last, *, bq, bk, scale, interpret):
    b, h, n, d = q.shape
    kvh = k.shape[1]
    groups = h // kvh
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, L]
    row = pl.BlockSpec((None, n), lambda bi, hi, i: (bi, 0))
    head_rows = pl.BlockSpec((None, None, n, d), lambda bi, hi, i: (bi, hi, 0, 0))
    head_vec = pl.BlockSpec((None, None, n), lambda bi, hi, i: (bi, hi, 0))
    q_block = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i: (bi, hi, i, 0))
    q_vec = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
    kv_rows = pl.BlockSpec((None, None, n, d), lambda bi, hi, i: (bi, hi // groups, 0, 0))
    kv_block = pl.BlockSpec((None, None, bk, d), lambda bi, hi, j: (bi, hi // groups, j, 0))
    head_kv_block = pl.BlockSpec((None, None, bk, d), lambda bi, hi, j: (bi, hi, j, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bk=bk, scale=scale,
                          precision=_precision(q.dtype)),
        grid=(b, h, n // bq),
        in_specs=[q_block, kv_rows, kv_rows, q_block, q_vec, q_vec, row, row, row],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="mtrl_flash_dq",
    )(q, k, v, do, lse, delta, seg, par, first)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq, bk=bk, scale=scale,
                          precision=_precision(q.dtype)),
        grid=(b, h, n // bk),
        in_specs=[head_rows, kv_block, kv_block, head_rows, head_vec, head_vec, row, row, row],
        out_specs=[head_kv_block, head_kv_block],
        out_shape=[jax.ShapeDtypeStruct((b, h, n, d), jnp.float32)] * 2,
        interpret=interpret,
        name="mtrl_flash_dkv",
    )(q, k, v, do, lse, delta, seg, par, last)
    # per query head -> per key head: the sum over the heads of each group
    dk = dk.reshape(b, kvh, groups, n, d).sum(axis=2).astype(k.dtype)
    dv = dv.reshape(b, kvh, groups, n, d).sum(axis=2).astype(v.dtype)
    return dq, dk, dv


# ------------------------------------------------------------------------------- the op


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, seg, par, bq, bk, scale, interpret):
    first, _ = jax.vmap(_bounds)(seg, par)
    return _forward(q, k, v, seg, par, first, bq=bq, bk=bk, scale=scale,
                    interpret=interpret)[0]


def _flash_fwd(q, k, v, seg, par, bq, bk, scale, interpret):
    first, last = jax.vmap(_bounds)(seg, par)
    out, lse = _forward(q, k, v, seg, par, first, bq=bq, bk=bk, scale=scale,
                        interpret=interpret)
    return out, (q, k, v, seg, par, first, last, out, lse)


def _flash_bwd(bq, bk, scale, interpret, res, do):
    q, k, v, seg, par, first, last, out, lse = res
    dq, dk, dv = _backward(q, k, v, out, lse, do, seg, par, first, last, bq=bq, bk=bk,
                           scale=scale, interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    parent_ids: jax.Array | None = None, *, block_q: int = 64,
                    block_k: int = 64, interpret: bool | None = None,
                    mesh=None) -> jax.Array:
    """Grouped-query attention over packed rows, equal to ``attend(q, k, v,
    packed_mask(segment_ids, parent_ids))`` for every query that is not padding (padding
    queries get 0 here, a uniform average there; both are ignored downstream).

    Args:
      q: ``[B, L, H, D]``; k, v: ``[B, L, KV, D]`` (``H`` a multiple of ``KV``).
      segment_ids: ``[B, L] int``, 0 = padding; parent_ids: ``[B, L] int`` or ``None``.
      block_q, block_k: rows per query / key block (powers of 2, at least 16; shrunk to the
        padded row length when it is shorter).
      interpret: run the kernels in Pallas interpret mode (default: on CPU).
      mesh: a ``jax.sharding.Mesh`` (or abstract mesh) to run the kernel on shard by shard
        (see the module doc); default: the mesh ``jax.set_mesh`` made current, if it has
        more than one device.

    Returns ``[B, L, H, D]`` in ``q``'s dtype. Rows and the head dim are padded to powers of 2
    (at least 16) internally.
    """
    b, n, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, n) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, L, H, D] and "
                         "k, v [B, L, KV, D] with H a multiple of KV")
    if segment_ids.shape != (b, n) or (parent_ids is not None and parent_ids.shape != (b, n)):
        raise ValueError(f"segment_ids / parent_ids must be [B, L] = {(b, n)}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {blk}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if mesh is None:
        current = jax.sharding.get_abstract_mesh()
        mesh = None if current.empty else current
    kw = dict(block_q=block_q, block_k=block_k, interpret=interpret)
    par = jnp.zeros_like(segment_ids) if parent_ids is None else parent_ids
    if mesh is not None and mesh.size > 1:
        rows, heads = shard_axes(mesh, b, h, k.shape[2])
        if rows or heads:
            qkv = P(rows, None, heads, None)
            return jax.shard_map(functools.partial(_local, **kw), mesh=mesh,
                                 in_specs=(qkv, qkv, qkv, P(rows, None), P(rows, None)),
                                 out_specs=qkv, check_vma=False)(q, k, v, segment_ids, par)
    return _local(q, k, v, segment_ids, par, **kw)


def shard_axes(mesh, rows: int, heads: int, kv_heads: int
               ) -> tuple[tuple[str, ...] | None, str | None]:
    """The mesh axes that split the rows (``data``, ``fsdp``: each where the rows still
    divide) and the heads (``tensor``, where both head counts divide) for the kernel."""
    split, n = [], 1
    for axis in ("data", "fsdp"):
        size = mesh.shape.get(axis, 1)
        if size > 1 and rows % (n * size) == 0:
            split.append(axis)
            n *= size
    t = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if t > 1 and heads % t == 0 and kv_heads % t == 0 else None
    return (tuple(split) or None), head_axis


def _local(q, k, v, segment_ids, parent_ids, *, block_q, block_k, interpret):
    """The kernel on one device's ``[B, L, H, D]`` inputs (see :func:`flash_attention`)."""
    _, n, _, d = q.shape
    # rows padded to a power of 2 (Triton's block dimensions must be; the padding is segment
    # 0, whose query blocks visit one key block each)
    n_pad = _pow2_at_least(n)
    bq, bk = min(block_q, n_pad), min(block_k, n_pad)
    d_pad = _pow2_at_least(d)
    seg = segment_ids.astype(jnp.int32)
    par = parent_ids.astype(jnp.int32)

    def prep(x):  # [B, L, heads, D] -> [B, heads, L_pad, D_pad]
        x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, d_pad - d)))
        return jnp.transpose(x, (0, 2, 1, 3))

    seg = jnp.pad(seg, ((0, 0), (0, n_pad - n)))
    par = jnp.pad(par, ((0, 0), (0, n_pad - n)))
    out = _flash(prep(q), prep(k), prep(v), seg, par, bq, bk, float(d) ** -0.5,
                 interpret)  # zero columns of the padded head dim change no score
    return jnp.transpose(out, (0, 2, 1, 3))[:, :n, :, :d]
