"""Degenerate inputs: zero updates, zero layers, extreme scales, repeated singular values.

Every metric must stay finite wherever it is defined, match the float64
reference, and have a finite gradient with respect to the updates and the
components.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jresid.metrics import (
    MetricOptions,
    complexity_components,
    complexity_sequence,
    complexity_window,
    energy,
    expansion,
    innovation,
    layer_metrics,
)
from jresid.metrics.spectral import computed_after, eigvalsh, pinv_quadratic_form
from tests import metrics_reference as ref

NUM_POSITIONS = 40
WIDTH = 48
ROWS = 4


def _gaussian_components(seed=0):
    return ref.make_components("gaussian", NUM_POSITIONS, ROWS, WIDTH, seed)


def _case_zero_tokens():
    components = _gaussian_components(1)
    components[[0, 5, 6, 17, 39]] = 0.0
    return components, 1e-6


def _case_zero_layer():
    return np.zeros((NUM_POSITIONS, ROWS, WIDTH)), 1e-6


def _case_scaled(scale):
    return _gaussian_components(2) * scale, 0.0


def _case_mixed_scales():
    components = _gaussian_components(3)
    components[::3] *= 1e20
    components[1::3] *= 1e-20
    return components, 0.0


def _case_duplicates():
    # Every history contains repeats: tokens come in runs of three equal
    # updates, and one whole window repeats a single update.
    components = _gaussian_components(4)
    for t in range(1, NUM_POSITIONS):
        if t % 3:
            components[t] = components[t - 1]
    components[20:30] = components[20]
    return components, 1e-6


def _case_orthogonal_equal_norms():
    # Updates along distinct basis vectors with equal norms, so every history
    # Gram matrix is a multiple of the identity with all eigenvalues equal.
    # Each position's component rows are orthogonal with equal norms too.
    components = np.zeros((NUM_POSITIONS, ROWS, WIDTH))
    for t in range(NUM_POSITIONS):
        for r in range(ROWS):
            components[t, r, (t + r * 11) % WIDTH] = 2.0
    return components, 1e-6


def _case_tiny_with_default_eps():
    return _gaussian_components(5) * 1e-20, 1e-6


CASES = {
    "zero tokens": _case_zero_tokens,
    "zero layer": _case_zero_layer,
    "norm 1e-20": functools.partial(_case_scaled, 1e-20),
    "norm 1e20": functools.partial(_case_scaled, 1e20),
    "1e-20 and 1e20 in one layer": _case_mixed_scales,
    "duplicate updates": _case_duplicates,
    "orthogonal equal norms": _case_orthogonal_equal_norms,
    "norm 1e-20 below eps": _case_tiny_with_default_eps,
}

VALID = ref.make_valid("left", NUM_POSITIONS)

_layer_metrics = jax.jit(layer_metrics, static_argnums=(3,))


def _metric_functions():
    """Return (name, fn(u, components, eps), reference(u, components, eps)) for every metric and option.

    `eps` is traced, so one compiled program serves every case.
    """
    valid = jnp.asarray(VALID)
    functions = [
        ("energy", lambda u, c, eps: energy(u, valid, eps=eps), lambda u, c, eps: ref.energy(u, VALID)),
    ]
    for window in (3, None):
        functions.append(
            (
                f"innovation window={window}",
                lambda u, c, eps, w=window: innovation(u, valid, window=w, eps=eps),
                lambda u, c, eps, w=window: ref.innovation(u, VALID, window=w, eps=eps),
            )
        )
    for case in (
        dict(history="window", window=3),
        dict(history="full"),
        dict(history="ema", decay=0.6),
        dict(history="ema", decay=0.95, energy_fraction=0.9),
    ):
        functions.append(
            (
                f"expansion {case}",
                lambda u, c, eps, k=case: expansion(u, valid, eps=eps, **k),
                lambda u, c, eps, k=case: ref.expansion(u, VALID, eps=eps, **k),
            )
        )
    for measure in ("effective", "numerical", "stable", "participation"):
        functions += [
            (
                f"complexity components {measure}",
                lambda u, c, eps, m=measure: complexity_components(c, valid, rank_measure=m),
                lambda u, c, eps, m=measure: ref.complexity_components(c, VALID, rank_measure=m),
            ),
            (
                f"complexity window {measure}",
                lambda u, c, eps, m=measure: complexity_window(u, valid, window=4, rank_measure=m, eps=eps),
                lambda u, c, eps, m=measure: ref.complexity_window(u, VALID, window=4, rank_measure=m, eps=eps),
            ),
            (
                f"complexity sequence {measure}",
                lambda u, c, eps, m=measure: complexity_sequence(u, valid, rank_measure=m, eps=eps),
                lambda u, c, eps, m=measure: ref.complexity_sequence(u, VALID, rank_measure=m, eps=eps),
            ),
        ]
    return functions


METRICS = _metric_functions()


def _finite_sum(fn):
    """Return a loss: the sum of the finite entries of fn's output."""

    def loss(u, c, eps):
        values = fn(u, c, eps)
        return jnp.sum(jnp.where(jnp.isfinite(values), values, 0.0))

    return loss


# Each metric's inputs wait for the previous metric's output, so that one
# compiled program never runs two eigensolvers at once (see computed_after).


@jax.jit
def _all_values(u, c, eps):
    outputs = []
    for _, fn, _ in METRICS:
        u, c = computed_after((u, c), *outputs[-1:])
        outputs.append(fn(u, c, eps))
    return tuple(outputs)


@jax.jit
def _all_gradients(u, c, eps):
    outputs = []
    for _, fn, _ in METRICS:
        u, c = computed_after((u, c), *outputs[-1:])
        outputs.append(jax.grad(_finite_sum(fn), argnums=(0, 1))(u, c, eps))
    return tuple(outputs)


def _tolerance(name):
    if name.startswith("energy"):
        return dict(atol=0.0, rtol=1e-6)
    if name.startswith("innovation"):
        return dict(atol=2e-6)
    if name.startswith("expansion"):
        return dict(atol=5e-5)
    return dict(atol=1e-6, rtol=5e-5)


@pytest.mark.parametrize("case_name", list(CASES))
def test_degenerate_inputs_match_reference(case_name):
    components, eps = CASES[case_name]()
    u = components.sum(axis=1)
    u32 = jnp.asarray(u, jnp.float32)
    values = _all_values(u32, jnp.asarray(components, jnp.float32), eps)
    for (name, _, reference), got in zip(METRICS, values):
        if name.startswith("energy"):
            # The norm of the float32 input, so that 1e20 and 1e-20 compare exactly.
            expected = ref.energy(np.asarray(u32, np.float64), VALID)
        else:
            expected = reference(u, components, eps)
        ref.assert_matches(np.asarray(got), expected, what=f"{case_name}: {name}", **_tolerance(name))


@pytest.mark.parametrize("case_name", list(CASES))
def test_degenerate_inputs_have_finite_gradients(case_name):
    components, eps = CASES[case_name]()
    u32 = jnp.asarray(components.sum(axis=1), jnp.float32)
    gradients = _all_gradients(u32, jnp.asarray(components, jnp.float32), eps)
    for (name, _, _), (grad_u, grad_c) in zip(METRICS, gradients):
        for label, grad in (("updates", grad_u), ("components", grad_c)):
            bad = np.argwhere(~np.isfinite(np.asarray(grad)))
            assert bad.size == 0, (
                f"{case_name}: gradient of {name} with respect to the {label} is not finite at "
                f"index {tuple(bad[0])}: {np.asarray(grad)[tuple(bad[0])]}"
            )


def test_zero_layer_values():
    options = MetricOptions(window=3, sequence_complexity=True)
    got = _layer_metrics(
        jnp.zeros((NUM_POSITIONS, WIDTH)), jnp.asarray(VALID), jnp.zeros((NUM_POSITIONS, ROWS, WIDTH)), options
    )
    valid_positions = np.flatnonzero(VALID)
    assert np.all(np.asarray(got.energy)[valid_positions] == 0.0), "energy of a zero update must be 0"
    assert np.all(np.isnan(np.asarray(got.innovation))), "innovation of a zero update must be NaN"
    assert np.all(np.isnan(np.asarray(got.expansion))), "expansion of a zero update must be NaN"
    assert np.all(np.asarray(got.complexity)[valid_positions] == 0.0), "complexity of a zero matrix must be 0"
    assert float(got.sequence_complexity) == 0.0, "sequence complexity of a zero layer must be 0"


def test_layer_without_valid_tokens_is_all_nan():
    options = MetricOptions(sequence_complexity=True)
    rng = np.random.default_rng(0)
    got = _layer_metrics(
        jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
        jnp.zeros(8, dtype=bool),
        jnp.asarray(rng.normal(size=(8, 2, 5)), jnp.float32),
        options,
    )
    for field in ("energy", "innovation", "expansion", "complexity", "sequence_complexity"):
        assert np.all(np.isnan(np.asarray(getattr(got, field)))), f"{field} without valid tokens must be NaN"


def test_zero_update_stays_out_of_histories():
    # A zero update between two equal ones: it is skipped by the max and adds
    # nothing to the span, so the third token repeats the first.
    u = np.zeros((3, 4))
    u[0] = [1.0, 2.0, 0.0, 0.0]
    u[2] = u[0]
    valid = jnp.ones(3, dtype=bool)
    u32 = jnp.asarray(u, jnp.float32)
    assert np.isnan(float(innovation(u32, valid, window=1)[2])), (
        "with window=1 the only history of the third token is the zero update, so innovation must be NaN"
    )
    assert abs(float(innovation(u32, valid, window=2)[2])) <= 1e-7
    assert abs(float(expansion(u32, valid, window=2)[2])) <= 1e-6
    assert float(expansion(u32, valid, window=1)[2]) == 1.0, "an all-degenerate history spans {0}: expansion 1"


def test_padding_contents_never_matter():
    # NaN, inf and huge values in padding leave valid results and gradients unchanged.
    components = _gaussian_components(6)
    u = components.sum(axis=1)
    garbage_u = u.copy()
    garbage_c = components.copy()
    padding = np.flatnonzero(~VALID)
    garbage_u[padding[0]] = np.nan
    garbage_u[padding[1]] = np.inf
    garbage_u[padding[2:]] = 1e30
    garbage_c[padding[0]] = np.nan
    garbage_c[padding[1:]] = -np.inf
    options = MetricOptions(window=3, sequence_complexity=True)

    def run(u_, c_):
        return _layer_metrics(jnp.asarray(u_, jnp.float32), jnp.asarray(VALID), jnp.asarray(c_, jnp.float32), options)

    clean, dirty = run(u, components), run(garbage_u, garbage_c)
    for field in ("energy", "innovation", "expansion", "complexity", "sequence_complexity"):
        np.testing.assert_array_equal(getattr(dirty, field), getattr(clean, field), err_msg=f"{field} saw the padding")

    def loss(u_, c_):
        metrics = layer_metrics(u_, jnp.asarray(VALID), c_, options)
        return sum(jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0)) for x in metrics)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(garbage_u, jnp.float32), jnp.asarray(garbage_c, jnp.float32)
    )
    for label, grad in zip(("updates", "components"), grads):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), f"gradient with respect to the {label} is not finite with garbage padding"
        assert np.all(grad[padding] == 0.0), f"gradient with respect to padding {label} must be 0"


def test_near_cut_projection_error_bound():
    # A window whose weakest kept direction has sigma = r * sigma_max, with the
    # update mostly along it: the float32 Gram route loses about
    # eps32 / r^2 of that share, the documented accuracy limit.
    eps32 = float(np.finfo(np.float32).eps)
    rng = np.random.default_rng(9)
    basis, _ = np.linalg.qr(rng.normal(size=(WIDTH, 4)))
    for ratio in (1e-1, 1e-2, 3e-3):
        u = np.zeros((5, WIDTH))
        u[0] = basis[:, 0]
        u[1] = basis[:, 1]
        u[2] = basis[:, 2]
        u[3] = ratio * basis[:, 3] + 0.5 * basis[:, 0]
        u[4] = basis[:, 3] + 0.1 * basis[:, 1] + 0.3 * rng.normal(size=WIDTH) / np.sqrt(WIDTH)
        valid = np.ones(5, dtype=bool)
        got = float(expansion(jnp.asarray(u, jnp.float32), jnp.asarray(valid), window=4)[4])
        expected = ref.expansion(u, valid, window=4)[4]
        bound = 4.0 * eps32 / ratio**2 + 1e-6
        assert abs(got - expected) <= bound, (
            f"sigma ratio {ratio}: expansion {got:.9g} vs reference {expected:.9g}, error above {bound:.3g}"
        )


def _directional_derivative(fn, x, direction, step):
    return (fn(x + step * direction) - fn(x - step * direction)) / (2.0 * step)


@pytest.mark.parametrize("structure", ["distinct", "repeated", "rank_deficient"])
def test_spectral_jvps_match_finite_differences(structure):
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        if structure == "distinct":
            h = rng.normal(size=(5, 7))
        elif structure == "repeated":
            h = 2.0 * np.eye(5, 7)
        else:
            h = rng.normal(size=(5, 2)) @ rng.normal(size=(2, 7))
        gram = jnp.asarray(h @ h.T)
        b = jnp.asarray(h @ rng.normal(size=7))
        direction_h = rng.normal(size=h.shape)
        dgram = jnp.asarray(direction_h @ h.T + h @ direction_h.T)
        db = jnp.asarray(rng.normal(size=5))

        def eigen_sum(g):
            # A symmetric function of the eigenvalues, smooth at repeats.
            w = eigvalsh(g)
            return jnp.sum(jnp.sqrt(jnp.maximum(w, 0.0) + 1.0))

        _, tangent = jax.jvp(eigen_sum, (gram,), (dgram,))
        numeric = _directional_derivative(eigen_sum, gram, dgram, 1e-6)
        assert abs(float(tangent) - float(numeric)) <= 1e-6 * max(1.0, abs(float(numeric))), (
            f"{structure}: eigvalsh JVP {float(tangent):.9g} vs finite difference {float(numeric):.9g}"
        )

        def form(g, v):
            return pinv_quadratic_form(g, v, 1e-3, None)

        _, tangent = jax.jvp(form, (gram, b), (dgram, db))
        numeric = (form(gram + 1e-6 * dgram, b + 1e-6 * db) - form(gram - 1e-6 * dgram, b - 1e-6 * db)) / 2e-6
        assert abs(float(tangent) - float(numeric)) <= 1e-5 * max(1.0, abs(float(numeric))), (
            f"{structure}: pinv_quadratic_form JVP {float(tangent):.9g} vs finite difference {float(numeric):.9g}"
        )


def is_eigensolver_call(rhs):
    return "syevd" in rhs or "python_cpu_callback" in rhs


def _eigensolver_order_violations(hlo_text):
    """Return pairs of eigensolver calls in one HLO computation that do not depend on each other.

    An instruction counts as an eigensolver call when it is a LAPACK
    `syevd` custom call, a host callback (the NumPy eigensolvers), or calls a computation that contains one (a while
    loop, for instance). Two such calls may only run one after the other
    when one is an ancestor of the other through operands.
    """
    computations = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(1), {})
            continue
        instruction = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$", line)
        if instruction and current is not None:
            current[instruction.group(1)] = instruction.group(2)

    def references(rhs):
        return set(re.findall(r"%([\w.\-]+)", rhs))

    contains_eigensolver = {}

    def computation_has_eigensolver(name):
        if name not in contains_eigensolver:
            contains_eigensolver[name] = False
            contains_eigensolver[name] = any(
                is_eigensolver_call(rhs) or any(ref in computations and computation_has_eigensolver(ref) for ref in references(rhs))
                for rhs in computations[name].values()
            )
        return contains_eigensolver[name]

    violations = []
    for name, instructions in computations.items():
        calls = [
            op
            for op, rhs in instructions.items()
            if is_eigensolver_call(rhs) or any(ref in computations and computation_has_eigensolver(ref) for ref in references(rhs))
        ]
        ancestors = {}

        def ancestors_of(op):
            if op not in ancestors:
                ancestors[op] = set()
                for ref in references(instructions[op]):
                    if ref in instructions:
                        ancestors[op] |= {ref} | ancestors_of(ref)
            return ancestors[op]

        for i, first in enumerate(calls):
            for second in calls[i + 1 :]:
                if first not in ancestors_of(second) and second not in ancestors_of(first):
                    violations.append((name, first, second))
    return violations


EIGENSOLVER_PROGRAMS = {
    "full history, several batches per bucket": (
        lambda u, v, c: expansion(u, v, history="full"),
        320,
    ),
    "layer metrics with every complexity": (
        lambda u, v, c: layer_metrics(
            u, v, None, MetricOptions(complexity_basis="window", sequence_complexity=True)
        ),
        96,
    ),
    "layer metrics defaults": (lambda u, v, c: layer_metrics(u, v, c, MetricOptions(sequence_complexity=True)), 96),
    "ema history": (lambda u, v, c: layer_metrics(u, v, c, MetricOptions(history="ema", decay=0.8)), 96),
    "gradient of layer metrics": (
        jax.grad(
            lambda u, v, c: sum(
                jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0))
                for x in layer_metrics(u, v, c, MetricOptions(history="full", sequence_complexity=True))
            )
        ),
        96,
    ),
}


@pytest.mark.parametrize("program", list(EIGENSOLVER_PROGRAMS))
def test_cpu_programs_leave_eigensolvers_to_numpy(program):
    # jaxlib's batched CPU LAPACK kernels can deadlock XLA's thread pool when
    # several run at once, so on the CPU every eigensolver runs in NumPy, and
    # the calls that remain are still ordered one after the other.
    fn, num_positions = EIGENSOLVER_PROGRAMS[program]
    u = jnp.zeros((num_positions, 16))
    valid = jnp.ones(num_positions, dtype=bool)
    components = jnp.zeros((num_positions, 3, 16))
    hlo_text = jax.jit(fn).lower(u, valid, components).compile().as_text()
    assert "syevd" not in hlo_text, f"{program}: the program calls jaxlib's LAPACK eigensolver"
    assert "callback" in hlo_text, f"{program}: the program should call the NumPy eigensolver"
    violations = _eigensolver_order_violations(hlo_text)
    assert not violations, f"{program}: independent eigensolver calls {violations[:3]}"


def test_large_host_eigenvalues_match_float64():
    from jresid.metrics import spectral

    rng = np.random.default_rng(3)
    n = spectral.LARGE_EIGVALSH + 36
    rows = rng.normal(size=(2, n, 40)) @ rng.normal(size=(40, 200))
    gram = (rows @ np.swapaxes(rows, 1, 2)).astype(np.float32)
    gram[1, 3, 5] = np.nan
    values = spectral._numpy_eigvalsh(gram)
    expected = np.linalg.eigvalsh(gram[0].astype(np.float64))
    assert values.dtype == np.float32
    np.testing.assert_allclose(values[0], expected, atol=1e-5 * expected.max())
    assert np.isnan(values[1]).all()
