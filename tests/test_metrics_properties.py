"""Hypothesis property tests of the metrics, each checked against the float64 reference or an exact value.

Shapes stay fixed (24 tokens, width 32, 3 heads) and options come from short
lists, so each property compiles only a few programs. The width exceeds the
token count so that the "full" history never becomes a square, badly
conditioned matrix, where float32 and float64 legitimately differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jresid.metrics import MetricOptions, layer_metrics
from tests import metrics_reference as ref

NUM_POSITIONS = 24
WIDTH = 32
ROWS = 4

INNOVATION_ATOL = 2e-6
EXPANSION_ATOL = 5e-5
COMPLEXITY_RTOL = 5e-5

_layer_metrics = jax.jit(layer_metrics, static_argnums=(3,))

OPTIONS = [
    MetricOptions(window=4),
    MetricOptions(history="full", complexity_basis="window", complexity_window=5, rank_measure="numerical"),
    MetricOptions(history="ema", decay=0.7, complexity_basis="sequence", rank_measure="stable"),
    MetricOptions(window=2, rank_measure="participation", sequence_complexity=True),
]

PROPERTY_SETTINGS = settings(max_examples=12, deadline=None)


def _components(seed):
    """Return gaussian components [T, R, D] (float64) and their sum, the updates."""
    components = ref.make_components("gaussian", NUM_POSITIONS, ROWS, WIDTH, seed)
    return components, components.sum(axis=1)


def _run(u, valid, components, options):
    return _layer_metrics(
        jnp.asarray(u, jnp.float32), jnp.asarray(valid), jnp.asarray(components, jnp.float32), options
    )


def _reference(u, valid, components, options):
    """Return the reference of every LayerMetrics field as a dict."""
    window = options.window if options.history == "window" else None
    measure = dict(rank_measure=options.rank_measure, rtol=options.rtol)
    if options.complexity_basis == "components":
        complexity = ref.complexity_components(components, valid, **measure)
    elif options.complexity_basis == "window":
        complexity = ref.complexity_window(u, valid, window=options.complexity_window, eps=options.eps, **measure)
    else:
        complexity = np.where(valid, ref.complexity_sequence(u, valid, eps=options.eps, **measure), np.nan)
    sequence = np.nan
    if options.sequence_complexity or options.complexity_basis == "sequence":
        sequence = ref.complexity_sequence(u, valid, eps=options.eps, **measure)
    return dict(
        energy=ref.energy(u, valid),
        innovation=ref.innovation(u, valid, window=window, eps=options.eps),
        expansion=ref.expansion(
            u,
            valid,
            history=options.history,
            window=options.window,
            decay=options.decay,
            energy_fraction=options.energy_fraction,
            rtol=options.rtol,
            eps=options.eps,
        ),
        complexity=complexity,
        sequence_complexity=np.array(sequence),
    )


def _assert_all_match(got, expected, what, energy_factor=1.0):
    ref.assert_matches(got.energy, energy_factor * expected["energy"], atol=0.0, rtol=1e-5, what=f"{what}: energy")
    ref.assert_matches(got.innovation, expected["innovation"], atol=INNOVATION_ATOL, what=f"{what}: innovation")
    ref.assert_matches(got.expansion, expected["expansion"], atol=EXPANSION_ATOL, what=f"{what}: expansion")
    ref.assert_matches(
        got.complexity, expected["complexity"], atol=0.0, rtol=COMPLEXITY_RTOL, what=f"{what}: complexity"
    )
    ref.assert_matches(
        got.sequence_complexity,
        expected["sequence_complexity"],
        atol=0.0,
        rtol=COMPLEXITY_RTOL,
        what=f"{what}: sequence_complexity",
    )


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    log10_scale=st.floats(-4.0, 4.0),
    options=st.sampled_from(OPTIONS),
)
def test_scaling_by_positive_constant(seed, log10_scale, options):
    scale = 10.0**log10_scale
    components, u = _components(seed)
    valid = ref.make_valid("left", NUM_POSITIONS)
    got = _run(scale * u, valid, scale * components, options)
    _assert_all_match(got, _reference(u, valid, components, options), f"scale {scale:.3g}", energy_factor=scale)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 10_000), options=st.sampled_from(OPTIONS))
def test_orthogonal_rotation_of_basis(seed, options):
    components, u = _components(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(seed + 1).normal(size=(WIDTH, WIDTH)))
    valid = ref.make_valid("right", NUM_POSITIONS)
    got = _run(u @ rotation, valid, components @ rotation, options)
    _assert_all_match(got, _reference(u, valid, components, options), "rotated basis")


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    window=st.integers(1, 6),
    position=st.integers(8, NUM_POSITIONS - 1),
)
def test_update_in_window_span_has_expansion_zero(seed, window, position):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(NUM_POSITIONS, WIDTH))
    coefficients = rng.normal(size=window) + np.sign(rng.normal(size=window))
    u[position] = coefficients @ u[position - window : position]
    valid = np.ones(NUM_POSITIONS, dtype=bool)
    options = MetricOptions(window=window, complexity_basis="window")

    got = np.asarray(_run(u, valid, np.zeros((NUM_POSITIONS, 1, WIDTH)), options).expansion)
    expected = ref.expansion(u, valid, history="window", window=window)
    assert abs(got[position]) <= EXPANSION_ATOL, f"expansion at position {position}: {got[position]:.3g}, expected 0"
    ref.assert_matches(got, expected, atol=EXPANSION_ATOL, what=f"expansion, window {window}")


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    position=st.integers(1, NUM_POSITIONS - 1),
    options=st.sampled_from(OPTIONS),
)
def test_orthogonal_update_has_expansion_and_innovation_one(seed, position, options):
    # Every update but one lies in the first WIDTH - 1 coordinates; the one
    # at `position` lies along the last coordinate, orthogonal to all others.
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(NUM_POSITIONS, WIDTH))
    u[:, -1] = 0.0
    u[position] = 0.0
    u[position, -1] = rng.uniform(0.1, 10.0)
    valid = np.ones(NUM_POSITIONS, dtype=bool)
    components = np.zeros((NUM_POSITIONS, 2, WIDTH))
    components[:, 0] = u

    got = _run(u, valid, components, options)
    assert abs(float(got.expansion[position]) - 1.0) <= 1e-6, (
        f"expansion at position {position}: {float(got.expansion[position]):.9g}, expected 1"
    )
    assert abs(float(got.innovation[position]) - 1.0) <= 1e-6, (
        f"innovation at position {position}: {float(got.innovation[position]):.9g}, expected 1"
    )


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    lag=st.integers(1, 4),
    log10_scale=st.floats(-3.0, 3.0),
    position=st.integers(5, NUM_POSITIONS - 1),
)
def test_repeated_update_has_innovation_zero(seed, lag, log10_scale, position):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(NUM_POSITIONS, WIDTH))
    u[position] = 10.0**log10_scale * u[position - lag]
    valid = np.ones(NUM_POSITIONS, dtype=bool)
    options = MetricOptions(window=4, complexity_basis="window")

    got = np.asarray(_run(u, valid, np.zeros((NUM_POSITIONS, 1, WIDTH)), options).innovation)
    assert abs(got[position]) <= INNOVATION_ATOL, f"innovation at position {position}: {got[position]:.3g}, expected 0"
    ref.assert_matches(got, ref.innovation(u, valid, window=4), atol=INNOVATION_ATOL, what="innovation")


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    log10_scale=st.floats(-3.0, 3.0),
    position=st.integers(1, NUM_POSITIONS - 1),
)
def test_negated_single_history_has_innovation_two(seed, log10_scale, position):
    # With window=1 the history of every token is the one update before it.
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(NUM_POSITIONS, WIDTH))
    u[position] = -(10.0**log10_scale) * u[position - 1]
    valid = np.ones(NUM_POSITIONS, dtype=bool)
    options = MetricOptions(window=1, complexity_basis="window")

    got = np.asarray(_run(u, valid, np.zeros((NUM_POSITIONS, 1, WIDTH)), options).innovation)
    assert abs(got[position] - 2.0) <= INNOVATION_ATOL, f"innovation at position {position}: {got[position]:.9g}, expected 2"
    ref.assert_matches(got, ref.innovation(u, valid, window=1), atol=INNOVATION_ATOL, what="innovation")


def test_negated_second_token_has_innovation_two():
    # Two valid tokens: the history of the second holds only the first.
    u = np.zeros((NUM_POSITIONS, WIDTH))
    u[3] = np.linspace(-1.0, 2.0, WIDTH)
    u[4] = -3.0 * u[3]
    valid = np.zeros(NUM_POSITIONS, dtype=bool)
    valid[3:5] = True
    options = MetricOptions(history="full", complexity_basis="window")
    got = _run(u, valid, np.zeros((NUM_POSITIONS, 1, WIDTH)), options)
    assert abs(float(got.innovation[4]) - 2.0) <= INNOVATION_ATOL, f"innovation {float(got.innovation[4]):.9g}, expected 2"
    assert np.isnan(float(got.innovation[3])), "the first valid token has no history and must be NaN"


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    log10_scale=st.floats(-15.0, 15.0),
    zero_rows=st.integers(0, ROWS - 1),
)
def test_rank_one_component_matrix_has_rank_one(seed, log10_scale, zero_rows):
    rng = np.random.default_rng(seed)
    coefficients = rng.normal(size=(NUM_POSITIONS, ROWS, 1))
    coefficients[:, :zero_rows] = 0.0
    direction = rng.normal(size=(NUM_POSITIONS, 1, WIDTH))
    components = 10.0**log10_scale * coefficients * direction
    u = components.sum(axis=1)
    valid = np.ones(NUM_POSITIONS, dtype=bool)

    for measure in ("numerical", "effective", "stable", "participation"):
        options = MetricOptions(rank_measure=measure, eps=0.0)
        got = np.asarray(_run(u, valid, components, options).complexity)
        worst = int(np.argmax(np.abs(got - 1.0)))
        assert abs(got[worst] - 1.0) <= 1e-5, (
            f"{measure} rank of a rank-one component matrix at position {worst}: {got[worst]:.9g}, expected 1"
        )


def _pad(u, components, valid, left, right, seed):
    """Return the inputs with `left` and `right` random padding tokens added."""
    rng = np.random.default_rng(seed)
    width = u.shape[1]
    rows = components.shape[1]
    padded_u = np.concatenate([rng.normal(size=(left, width)), u, rng.normal(size=(right, width))])
    padded_components = np.concatenate(
        [rng.normal(size=(left, rows, width)), components, rng.normal(size=(right, rows, width))]
    )
    padded_valid = np.concatenate([np.zeros(left, bool), valid, np.zeros(right, bool)])
    return padded_u, padded_components, padded_valid


# Different padding lengths give arrays of different shapes, and XLA picks
# reduction and matmul kernels by shape, so results agree to float32
# rounding rather than bit for bit.
PADDING_LENGTH_TOLERANCES = dict(
    energy=dict(atol=0.0, rtol=1e-6),
    innovation=dict(atol=1e-6),
    expansion=dict(atol=1e-5),
    complexity=dict(atol=0.0, rtol=1e-5),
)


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    left=st.sampled_from([0, 3, 9]),
    right=st.sampled_from([0, 5, 50]),
    options=st.sampled_from(OPTIONS),
)
def test_padding_length_changes_no_valid_result(seed, left, right, options):
    components, u = _components(seed)
    valid = np.ones(NUM_POSITIONS, dtype=bool)
    baseline = _run(u, valid, components, options)
    padded_u, padded_components, padded_valid = _pad(u, components, valid, left, right, seed)
    padded = _run(padded_u, padded_valid, padded_components, options)

    for field, tolerance in PADDING_LENGTH_TOLERANCES.items():
        values = np.asarray(getattr(padded, field))
        assert np.all(np.isnan(values[:left])), f"{field} at left padding must be NaN"
        assert np.all(np.isnan(values[left + NUM_POSITIONS :])), f"{field} at right padding must be NaN"
        ref.assert_matches(
            values[left : left + NUM_POSITIONS],
            np.asarray(getattr(baseline, field)),
            what=f"{field} with padding {left} left, {right} right",
            **tolerance,
        )
    ref.assert_matches(
        padded.sequence_complexity,
        baseline.sequence_complexity,
        atol=0.0,
        rtol=1e-5,
        what="sequence_complexity with padding",
    )
    _assert_all_match(padded, _reference(padded_u, padded_valid, padded_components, options), "padded")


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 10_000),
    total=st.sampled_from([6, 40]),
    left_share=st.floats(0.0, 1.0),
    options=st.sampled_from(OPTIONS),
)
def test_padding_side_gives_identical_results(seed, total, left_share, options):
    # The same number of padding tokens, split differently between the two
    # sides, gives arrays of one shape: the valid results are bit for bit equal.
    components, u = _components(seed)
    valid = np.ones(NUM_POSITIONS, dtype=bool)
    left = int(round(left_share * total))
    runs = []
    for left_count in (0, left, total):
        padded_u, padded_components, padded_valid = _pad(u, components, valid, left_count, total - left_count, seed)
        runs.append((left_count, _run(padded_u, padded_valid, padded_components, options)))

    first_left, first = runs[0]
    for left_count, other in runs[1:]:
        for field in ("energy", "innovation", "expansion", "complexity"):
            expected = np.asarray(getattr(first, field))[first_left : first_left + NUM_POSITIONS]
            got = np.asarray(getattr(other, field))[left_count : left_count + NUM_POSITIONS]
            mismatch = np.flatnonzero(~((got == expected) | (np.isnan(got) & np.isnan(expected))))
            assert mismatch.size == 0, (
                f"{field} with {left_count} of {total} padding tokens on the left differs at valid "
                f"position {mismatch[:1]}: {got[mismatch[:1]]} vs {expected[mismatch[:1]]}"
            )
        assert np.array_equal(first.sequence_complexity, other.sequence_complexity, equal_nan=True), (
            f"sequence_complexity with {left_count} of {total} padding tokens on the left: "
            f"{float(other.sequence_complexity)} vs {float(first.sequence_complexity)}"
        )
