"""Symmetric eigen helpers whose derivatives stay finite.

The derivative of `jnp.linalg.eigh`'s eigenvectors has 1 / (lambda_i -
lambda_j) factors, so repeated eigenvalues (an all-zero window, a history of
orthogonal updates of equal norm) give inf or NaN gradients to anything
computed from eigenvectors. The functions here define their own JVPs:

* `pinv_quadratic_form`: b^T f(A) b for the truncated pseudo-inverse f, with
  the Daleckii-Krein formula for d f(A), whose divided differences are taken
  in closed form so that equal eigenvalues give the derivative limit.
* `eigvalsh`: d lambda_j = v_j^T dA v_j. With jax 0.10.2 the built-in
  derivative of `jnp.linalg.eigvalsh` is finite too, because the unused
  eigenvector terms are dropped. This rule states the formula directly, so
  it does not rely on that.

Every function works on batches: leading axes of `a_NN` are batch axes.

On the CPU the decompositions run in NumPy through `jax.pure_callback`, for
two reasons measured with jaxlib 0.10.2. Its CPU `eigh` always computes
eigenvectors (540 ms for a 512 x 512 Gram matrix, against 90 ms for NumPy's
eigenvalues alone), and its batched LAPACK kernels split each batch over
XLA's thread pool and then wait for the pieces: when several devices of one
process run such a call at once, every pool thread waits and the program
never finishes. On GPU and TPU the built-in solvers run on the device.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np


def computed_after(value, *dependencies):
    """Return `value` unchanged, as a value XLA can only compute once `dependencies` exist.

    Eigensolver calls must not run side by side. jaxlib 0.10.2's batched
    LAPACK kernels split their batch over XLA's CPU thread pool and block
    until the pieces finish. Enough calls at once occupy every thread while
    their pieces wait in the queue, and the program hangs (seen with three
    independent eigh calls on a 2-core machine). Feeding each call's
    input through this function, with the previous call's output as the
    dependency, keeps at most one call in flight.

    The float leaves of `value` get 0.0 * (probe != probe) added, where the
    probe reads one entry of each dependency. That term is exactly zero for
    every probe, NaN and inf included, but XLA cannot fold it away. XLA's CPU
    pipeline drops `jax.lax.optimization_barrier` before scheduling, so a
    barrier does not order the calls.
    """
    leaves = jax.tree.leaves(dependencies)
    if not leaves:
        return value
    probe = sum(jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in leaves)
    zero = jax.lax.stop_gradient((probe != probe).astype(jnp.float32) * 0.0)

    def add_zero(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf + zero.astype(leaf.dtype)
        return leaf

    return jax.tree.map(add_zero, value)


def symmetrize(a_NN: jax.Array) -> jax.Array:
    """Return (A + A^T) / 2, the matrix `eigh` effectively decomposes."""
    return 0.5 * (a_NN + jnp.swapaxes(a_NN, -1, -2))


# Largest relative row length `row_floor` ever returns.
MAX_ROW_FLOOR = 2.0**-20

# Eigenvalue given to removed rows. It is negative, so every keep rule and
# rank measure ignores it, and it stays decoupled from the other rows, so
# eigh never works on a block of exact zeros (another slow case of LAPACK).
REMOVED_ROW_EIGENVALUE = -1.0


def row_floor(rtol: float) -> float:
    """Return the relative row length at or below which a Gram row is removed.

    Such a row has a singular value below rtol / 8 of the largest, so the
    rank rule drops its own direction, and it moves the kept eigenvalues by
    at most (rtol / 8)^2 of the largest. Keeping it would cost time instead:
    LAPACK's eigensolver slows down about 30 times (measured with jax 0.10.2
    on x86_64) when the products of such small entries approach float32
    subnormals.
    """
    return min(MAX_ROW_FLOOR, rtol / 8.0)


def gram_from_scaled_rows(
    scale_N: jax.Array, block_NN: jax.Array, floor: float
) -> tuple[jax.Array, jax.Array]:
    """Return the Gram matrix scale_i * scale_j * block_ij and the scales it used.

    `scale_N` contains row lengths divided by the largest (so at most 1),
    and `block_NN` the cosines between the rows. Rows with scale at or below
    `floor` (see `row_floor`) get scale 0 and a decoupled
    REMOVED_ROW_EIGENVALUE.
    """
    used_N = scale_N > floor
    scale_N = jnp.where(used_N, scale_N, 0.0)
    gram_NN = scale_N[..., :, None] * scale_N[..., None, :] * block_NN
    removed_N = jnp.where(used_N, 0.0, REMOVED_ROW_EIGENVALUE).astype(gram_NN.dtype)
    gram_NN = gram_NN + removed_N[..., :, None] * jnp.eye(gram_NN.shape[-1], dtype=gram_NN.dtype)
    return gram_NN, scale_N


def remove_small_rows(gram_NN: jax.Array, floor: float) -> jax.Array:
    """Return a Gram matrix whose rows of norm <= `floor` times the largest are removed.

    The removed rows get a decoupled REMOVED_ROW_EIGENVALUE; see
    `gram_from_scaled_rows` and `row_floor`.
    """
    diagonal_N = jnp.diagonal(gram_NN, axis1=-2, axis2=-1)
    largest = jnp.max(diagonal_N, axis=-1, keepdims=True)
    used_N = diagonal_N > (floor * floor) * largest
    kept_NN = used_N[..., :, None] & used_N[..., None, :]
    gram_NN = jnp.where(kept_NN, gram_NN, 0.0)
    removed_N = jnp.where(used_N, 0.0, REMOVED_ROW_EIGENVALUE).astype(gram_NN.dtype)
    return gram_NN + removed_N[..., :, None] * jnp.eye(gram_NN.shape[-1], dtype=gram_NN.dtype)


def _numpy_solve(a_NN: np.ndarray, solver) -> tuple[np.ndarray, ...]:
    # NumPy raises on a matrix with NaN or inf, or one whose solver does not
    # converge, where jax's solvers give NaN. Such matrices get NaN here too.
    a_NN = np.asarray(a_NN)
    finite = np.isfinite(a_NN).all(axis=(-2, -1))
    safe_NN = np.where(finite[..., None, None], a_NN, 0.0)
    try:
        results = solver(safe_NN)
    except np.linalg.LinAlgError:
        flat_finite = finite.reshape(-1).copy()
        pieces = []
        for index, matrix in enumerate(safe_NN.reshape((-1,) + safe_NN.shape[-2:])):
            try:
                piece = solver(matrix)
            except np.linalg.LinAlgError:
                piece = solver(np.eye(len(matrix), dtype=matrix.dtype))
                flat_finite[index] = False
            pieces.append(piece if isinstance(piece, tuple) else (piece,))
        results = tuple(np.stack(part).reshape(safe_NN.shape[:-2] + part[0].shape) for part in zip(*pieces))
        finite = flat_finite.reshape(finite.shape)
    if not isinstance(results, tuple):
        results = (results,)
    out = []
    for value in results:
        bad = ~finite.reshape(finite.shape + (1,) * (value.ndim - finite.ndim))
        out.append(np.where(bad, np.nan, value).astype(a_NN.dtype))
    return tuple(out)


def _numpy_eigh(a_NN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w_N, v_NN = _numpy_solve(a_NN, lambda m: tuple(np.linalg.eigh(m)))
    return w_N, v_NN


# Smallest matrix size whose eigenvalues scipy computes in the input's own
# precision. NumPy always works in float64. For a 512 x 512 float32 Gram
# matrix scipy took 7.4 ms against NumPy's 10.7 ms on a 2-core x86-64 CPU.
# For small matrices NumPy's batched loop is faster.
LARGE_EIGVALSH = 64


def _scipy_eigvalsh(a_MNN: np.ndarray) -> np.ndarray:
    import scipy.linalg

    flat_MNN = a_MNN.reshape((-1,) + a_MNN.shape[-2:])
    w_MN = np.stack([scipy.linalg.eigh(a_NN, eigvals_only=True, driver="evd", check_finite=False)
                     for a_NN in flat_MNN])
    return w_MN.reshape(a_MNN.shape[:-1])


def _numpy_eigvalsh(a_NN: np.ndarray) -> np.ndarray:
    solver = _scipy_eigvalsh if a_NN.shape[-1] >= LARGE_EIGVALSH else np.linalg.eigvalsh
    (w_N,) = _numpy_solve(a_NN, solver)
    return w_N


def _host_eigh(a_NN: jax.Array) -> tuple[jax.Array, jax.Array]:
    shapes = (jax.ShapeDtypeStruct(a_NN.shape[:-1], a_NN.dtype), jax.ShapeDtypeStruct(a_NN.shape, a_NN.dtype))
    return jax.pure_callback(_numpy_eigh, shapes, a_NN, vmap_method="expand_dims")


def _host_eigvalsh(a_NN: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct(a_NN.shape[:-1], a_NN.dtype)
    return jax.pure_callback(_numpy_eigvalsh, shape, a_NN, vmap_method="expand_dims")


def _device_eigh(a_NN: jax.Array) -> tuple[jax.Array, jax.Array]:
    w_N, v_NN = jnp.linalg.eigh(a_NN)
    return w_N, v_NN


_TRACE_STATE = threading.local()


@contextlib.contextmanager
def device_eigensolvers():
    """Trace the CPU eigensolvers as jaxlib's kernels, one matrix per call, inside this block.

    Programs that span several devices use this. There, host callbacks in a
    program with collectives can wait forever for their inputs (jaxlib
    0.10.2), and a batched kernel can starve the thread pool. One matrix per
    call runs without splitting its work.
    """
    previous = getattr(_TRACE_STATE, "device", False)
    _TRACE_STATE.device = True
    try:
        yield
    finally:
        _TRACE_STATE.device = previous


def _solver_kind() -> str:
    # Read while tracing: programs run on the default backend's devices.
    if jax.default_backend() != "cpu":
        return "device"
    return "one_at_a_time" if getattr(_TRACE_STATE, "device", False) else "host"


@jax.custom_batching.custom_vmap
def _eigh_one(a_NN: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _device_eigh(a_NN)


@_eigh_one.def_vmap
def _eigh_one_vmap(axis_size, in_batched, a_BNN):
    del axis_size
    (batched,) = in_batched
    if not batched:
        return _eigh_one(a_BNN), (False, False)
    return jax.lax.map(_eigh_one, a_BNN), (True, True)


def _eigh_one_at_a_time(a_NN: jax.Array) -> tuple[jax.Array, jax.Array]:
    flat_MNN = a_NN.reshape((-1,) + a_NN.shape[-2:])
    w_MN, v_MNN = jax.lax.map(_eigh_one, flat_MNN)
    return w_MN.reshape(a_NN.shape[:-1]), v_MNN.reshape(a_NN.shape)


def symmetric_eigh(a_NN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return `(eigenvalues, eigenvectors)` of symmetric matrices, eigenvalues ascending.

    No derivative rule: call it on values, not on what is differentiated.
    """
    kind = _solver_kind()
    if kind == "host":
        return _host_eigh(a_NN)
    if kind == "one_at_a_time":
        return _eigh_one_at_a_time(a_NN)
    return _device_eigh(a_NN)


def symmetric_eigvalsh(a_NN: jax.Array) -> jax.Array:
    """Return the eigenvalues of symmetric matrices, ascending, without eigenvectors where possible."""
    kind = _solver_kind()
    if kind == "host":
        return _host_eigvalsh(a_NN)
    if kind == "one_at_a_time":
        return _eigh_one_at_a_time(a_NN)[0]
    return jnp.linalg.eigvalsh(a_NN)


def _sandwich(v_NN: jax.Array, a_NN: jax.Array) -> jax.Array:
    """Return V^T A V."""
    return jnp.swapaxes(v_NN, -1, -2) @ a_NN @ v_NN


@jax.custom_jvp
def eigvalsh(a_NN: jax.Array) -> jax.Array:
    """Return the eigenvalues of the symmetrized matrix, in ascending order."""
    return symmetric_eigvalsh(symmetrize(a_NN))


@eigvalsh.defjvp
def _eigvalsh_jvp(primals, tangents):
    (a_NN,) = primals
    (da_NN,) = tangents
    w_N, v_NN = symmetric_eigh(symmetrize(a_NN))

    # First-order perturbation of each eigenvalue. Inside a cluster of equal
    # eigenvalues the split between them depends on the basis eigh returned,
    # but every symmetric function of the eigenvalues gets the right
    # derivative, and nothing here divides by a gap.
    dw_N = jnp.einsum("...ji,...jk,...ki->...i", v_NN, symmetrize(da_NN), v_NN)
    return w_N, dw_N


def keep_mask(w_N: jax.Array, rtol: float, energy_fraction: float | None = None) -> jax.Array:
    """Select the eigenvalues of a PSD Gram matrix that span the kept subspace.

    An eigenvalue is kept when it is positive, exceeds rtol^2 times the
    largest one (the singular value rule sigma > rtol * sigma_max), and, when
    `energy_fraction` is given, when the eigenvalues strictly larger than it
    sum to less than `energy_fraction` of the trace. That last rule keeps the
    smallest leading set that reaches the fraction, and keeps tied
    eigenvalues together so that the subspace does not depend on the basis
    eigh picked inside a cluster.

    Args:
        w_N: Eigenvalues; leading axes are batch axes.
        rtol: Relative singular value cut.
        energy_fraction: Fraction of the trace to keep, or None for the rank
            rule alone.

    Returns:
        Boolean mask of the same shape as `w_N`.
    """
    w_N = jnp.maximum(w_N, 0.0)
    w_max = jnp.max(w_N, axis=-1, keepdims=True)
    keep_N = (w_N > 0.0) & (w_N > (rtol * rtol) * w_max)
    if energy_fraction is not None and energy_fraction < 1.0:
        larger_NN = w_N[..., None, :] > w_N[..., :, None]
        mass_above_N = jnp.sum(jnp.where(larger_NN, w_N[..., None, :], 0.0), axis=-1)
        total = jnp.sum(w_N, axis=-1, keepdims=True)
        keep_N = keep_N & (mass_above_N < energy_fraction * total)
    return keep_N


def _inverse_where(keep_N: jax.Array, w_N: jax.Array) -> jax.Array:
    """Return 1 / w on kept entries and 0 elsewhere, with finite gradients."""
    return jnp.where(keep_N, 1.0 / jnp.where(keep_N, w_N, 1.0), 0.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def pinv_quadratic_form(
    gram_NN: jax.Array,
    b_N: jax.Array,
    rtol: float,
    energy_fraction: float | None = None,
) -> jax.Array:
    """Return b^T G_k^+ b, with G_k^+ the pseudo-inverse on the kept eigenvectors.

    For a history matrix H with G = H H^T and b = H x, this is the squared
    norm of x projected onto the right singular vectors of H that
    `keep_mask(rtol, energy_fraction)` keeps.

    Args:
        gram_NN: PSD Gram matrices; leading axes are batch axes.
        b_N: Vectors matching `gram_NN`'s leading axes.
        rtol: Relative singular value cut (static).
        energy_fraction: Energy rule of `keep_mask`, or None (static).

    Returns:
        The quadratic forms, one per batch entry.
    """
    w_N, v_NN = symmetric_eigh(symmetrize(gram_NN))
    keep_N = keep_mask(w_N, rtol, energy_fraction)
    y_N = jnp.einsum("...ji,...j->...i", v_NN, b_N)
    return jnp.sum(_inverse_where(keep_N, w_N) * y_N * y_N, axis=-1)


@pinv_quadratic_form.defjvp
def _pinv_quadratic_form_jvp(rtol, energy_fraction, primals, tangents):
    gram_NN, b_N = primals
    dgram_NN, db_N = tangents
    w_N, v_NN = symmetric_eigh(symmetrize(gram_NN))
    keep_N = keep_mask(w_N, rtol, energy_fraction)
    f_N = _inverse_where(keep_N, w_N)
    y_N = jnp.einsum("...ji,...j->...i", v_NN, b_N)
    dy_N = jnp.einsum("...ji,...j->...i", v_NN, db_N)
    q = jnp.sum(f_N * y_N * y_N, axis=-1)

    # Divided differences (f_i - f_j) / (w_i - w_j) of f(w) = 1/w on kept
    # eigenvalues and 0 elsewhere. Two kept: -1 / (w_i w_j) exactly, which is
    # also the limit -1/w^2 at equal eigenvalues. One kept: the kept
    # eigenvalue is strictly the larger one, because both rules keep a
    # leading set. The floor on the gap only guards against a gap that
    # rounds to zero. Two dropped: 0.
    keep_i = keep_N[..., :, None]
    keep_j = keep_N[..., None, :]
    f_i = f_N[..., :, None]
    f_j = f_N[..., None, :]
    gap_NN = w_N[..., :, None] - w_N[..., None, :]
    gap_floor = jnp.finfo(w_N.dtype).eps * jnp.max(jnp.abs(w_N), axis=-1)[..., None, None]
    gap_floor = jnp.maximum(gap_floor, jnp.finfo(w_N.dtype).tiny)
    both_kept = keep_i & keep_j
    only_i = keep_i & ~keep_j
    only_j = ~keep_i & keep_j
    safe_gap_i = jnp.where(only_i, jnp.maximum(gap_NN, gap_floor), 1.0)
    safe_gap_j = jnp.where(only_j, jnp.maximum(-gap_NN, gap_floor), 1.0)
    phi_NN = jnp.where(both_kept, -f_i * f_j, 0.0)
    phi_NN = phi_NN + jnp.where(only_i, f_i / safe_gap_i, 0.0)
    phi_NN = phi_NN + jnp.where(only_j, f_j / safe_gap_j, 0.0)

    m_NN = _sandwich(v_NN, symmetrize(dgram_NN))
    dq_from_gram = jnp.einsum("...i,...ij,...j->...", y_N, phi_NN * m_NN, y_N)
    dq_from_b = 2.0 * jnp.sum(f_N * y_N * dy_N, axis=-1)
    return q, dq_from_gram + dq_from_b
