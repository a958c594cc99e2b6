"""Compare every metric with the float64 NumPy reference in metrics_reference.py.

The JAX code works in float32 through Gram matrices; the reference works in
float64 through explicit SVDs and projections. The inputs keep every
singular value at least a factor of 3 away from the rtol cut, where float32
and float64 could legitimately disagree on the kept subspace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import metrics_reference as ref
from jresid.metrics import (
    MetricOptions,
    complexity_components,
    complexity_sequence,
    complexity_window,
    energy,
    expansion,
    innovation,
    layer_metrics,
    rank_from_singular_values,
)

# Histories run over up to ~100 tokens of width 128, so float32 Gram entries
# carry errors near 1e-7 and projections near 1e-6; these bounds leave a
# margin of about 5 over the largest errors seen. Fewer tokens than width
# keep the full history from becoming a square, badly conditioned matrix.
ENERGY_RTOL = 1e-6
INNOVATION_ATOL = 2e-6
EXPANSION_ATOL = 5e-5
COMPLEXITY_RTOL = 5e-5

NUM_POSITIONS = 96
WIDTH = 128
UPDATE_KINDS = ("gaussian", "low_rank_noise", "low_rank_tiny_noise", "rank_deficient", "dominant")
COMPONENT_KINDS = ("gaussian", "low_rank", "rank_one", "mixed")
RANK_MEASURES = ("effective", "numerical", "stable", "participation")

_energy = jax.jit(energy, static_argnames=("eps",))
_innovation = jax.jit(innovation, static_argnames=("window", "eps"))
_expansion = jax.jit(
    expansion, static_argnames=("history", "window", "decay", "energy_fraction", "rtol", "eps")
)
_complexity_components = jax.jit(complexity_components, static_argnames=("rank_measure", "rtol"))
_complexity_window = jax.jit(complexity_window, static_argnames=("window", "rank_measure", "rtol", "eps"))
_complexity_sequence = jax.jit(complexity_sequence, static_argnames=("rank_measure", "rtol", "eps"))
_layer_metrics = jax.jit(layer_metrics, static_argnums=(3,))


def _inputs(kind, mask, seed=0, num_positions=NUM_POSITIONS, width=WIDTH):
    u = ref.make_updates(kind, num_positions, width, seed)
    valid = ref.make_valid(mask, num_positions, seed)
    return u, valid, jnp.asarray(u, jnp.float32), jnp.asarray(valid)


@pytest.mark.parametrize("mask", ref.MASKS)
@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_energy_matches_reference(kind, mask):
    u, valid, u32, valid32 = _inputs(kind, mask)
    ref.assert_matches(
        _energy(u32, valid32),
        ref.energy(u, valid),
        atol=0.0,
        rtol=ENERGY_RTOL,
        what=f"energy ({kind}, padding {mask})",
    )


@pytest.mark.parametrize("window", [None, 1, 4, 16])
@pytest.mark.parametrize("mask", ref.MASKS)
@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_innovation_matches_reference(kind, mask, window):
    u, valid, u32, valid32 = _inputs(kind, mask)
    ref.assert_matches(
        _innovation(u32, valid32, window=window),
        ref.innovation(u, valid, window=window),
        atol=INNOVATION_ATOL,
        what=f"innovation (window={window}, {kind}, padding {mask})",
    )


# Histories cut to the last rows of each position.
SLIDING_CASES = [
    pytest.param(dict(history="window", window=1), id="window1"),
    pytest.param(dict(history="window", window=4), id="window4"),
    pytest.param(dict(history="window", window=8), id="window8"),
    pytest.param(dict(history="window", window=32), id="window32"),
    # decay 0.5 and 0.8 keep the last 12 and 36 rows plus the heaviest older ones.
    pytest.param(dict(history="ema", decay=0.5, energy_fraction=0.99), id="ema0.5"),
    pytest.param(dict(history="ema", decay=0.8, energy_fraction=0.9), id="ema0.8-fraction0.9"),
]

# Histories reaching back to the first row, computed in buckets of 64
# positions. They cost more, so they run on the three kinds that stress them
# most, with 72 tokens: one full bucket and part of a second.
PREFIX_CASES = [
    pytest.param(dict(history="full"), id="full"),
    pytest.param(dict(history="window", window=200), id="window-longer-than-sequence"),
    # decay 0.97 would keep 263 rows, more than the sequence has.
    pytest.param(dict(history="ema", decay=0.97, energy_fraction=0.99), id="ema0.97"),
]


PREFIX_POSITIONS = 72
PREFIX_WIDTH = 96


def _check_expansion(kind, case, num_positions=NUM_POSITIONS, width=WIDTH):
    # The left mask covers the padding paths; padding sides and holes get
    # their own test.
    u, valid, u32, valid32 = _inputs(kind, "left", num_positions=num_positions, width=width)
    ref.assert_matches(
        _expansion(u32, valid32, **case),
        ref.expansion(u, valid, **case),
        atol=EXPANSION_ATOL,
        what=f"expansion ({case}, {kind})",
    )


@pytest.mark.parametrize("case", SLIDING_CASES)
@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_expansion_sliding_history_matches_reference(kind, case):
    _check_expansion(kind, case)


@pytest.mark.parametrize("case", PREFIX_CASES)
@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient", "dominant"])
def test_expansion_prefix_history_matches_reference(kind, case):
    _check_expansion(kind, case, num_positions=PREFIX_POSITIONS, width=PREFIX_WIDTH)


@pytest.mark.parametrize("decay", [0.5, 0.8, 0.97])
def test_expansion_ema_rank_rule_alone_matches_reference(decay):
    # With energy_fraction=1 only the rtol cut selects directions, and on
    # full-rank data the decaying weights put singular values at every
    # scale, some within float32 rounding of the cut. A rank-4 signal with
    # 1e-6 noise keeps every singular value far from it.
    case = dict(history="ema", decay=decay, energy_fraction=1.0)
    u, valid, u32, valid32 = _inputs("low_rank_tiny_noise", "left", num_positions=PREFIX_POSITIONS)
    ref.assert_matches(
        _expansion(u32, valid32, **case),
        ref.expansion(u, valid, **case),
        atol=EXPANSION_ATOL,
        what=f"expansion ({case})",
    )


@pytest.mark.parametrize("mask", ref.MASKS)
def test_expansion_padding_patterns_match_reference(mask):
    u, valid, u32, valid32 = _inputs("rank_deficient", mask, seed=3)
    for case in (dict(history="window", window=8), dict(history="ema", decay=0.5)):
        ref.assert_matches(
            _expansion(u32, valid32, **case),
            ref.expansion(u, valid, **case),
            atol=EXPANSION_ATOL,
            what=f"expansion ({case}, padding {mask})",
        )


def test_expansion_full_history_saturates_width():
    # More tokens than width: once the span of the full history fills the
    # space, expansion falls to 0.
    u, valid, u32, valid32 = _inputs("low_rank_tiny_noise", "none", num_positions=64, width=16)
    got = np.asarray(_expansion(u32, valid32, history="full"))
    ref.assert_matches(got, ref.expansion(u, valid, history="full"), atol=EXPANSION_ATOL, what="expansion full")
    assert np.all(got[8:] < 1e-4), f"expansion after saturation: max {got[8:].max():.3g} at {8 + got[8:].argmax()}"


@pytest.mark.parametrize("rank_measure", RANK_MEASURES)
@pytest.mark.parametrize("kind", COMPONENT_KINDS)
def test_complexity_components_matches_reference(kind, rank_measure):
    components = ref.make_components(kind, 64, 15, WIDTH)
    valid = ref.make_valid("holes", 64)
    ref.assert_matches(
        _complexity_components(jnp.asarray(components, jnp.float32), jnp.asarray(valid), rank_measure=rank_measure),
        ref.complexity_components(components, valid, rank_measure=rank_measure),
        atol=0.0,
        rtol=COMPLEXITY_RTOL,
        what=f"complexity components ({rank_measure}, {kind})",
    )


@pytest.mark.parametrize("window", [1, 4, 8, 24])
@pytest.mark.parametrize("rank_measure", RANK_MEASURES)
@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_complexity_window_matches_reference(kind, rank_measure, window):
    u, valid, u32, valid32 = _inputs(kind, "right")
    ref.assert_matches(
        _complexity_window(u32, valid32, window=window, rank_measure=rank_measure),
        ref.complexity_window(u, valid, window=window, rank_measure=rank_measure),
        atol=0.0,
        rtol=COMPLEXITY_RTOL,
        what=f"complexity window ({window}, {rank_measure}, {kind})",
    )


@pytest.mark.parametrize("rank_measure", RANK_MEASURES)
@pytest.mark.parametrize("kind", UPDATE_KINDS)
def test_complexity_sequence_matches_reference(kind, rank_measure):
    u, valid, u32, valid32 = _inputs(kind, "holes")
    ref.assert_matches(
        _complexity_sequence(u32, valid32, rank_measure=rank_measure),
        ref.complexity_sequence(u, valid, rank_measure=rank_measure),
        atol=0.0,
        rtol=COMPLEXITY_RTOL,
        what=f"complexity sequence ({rank_measure}, {kind})",
    )


@pytest.mark.parametrize("rank_measure", RANK_MEASURES)
def test_rank_from_singular_values_matches_reference(rank_measure):
    rng = np.random.default_rng(7)
    sigma = rng.uniform(0.0, 1.0, size=(50, 12)) ** 4
    sigma[::5, 6:] = 0.0
    sigma[1::5] *= 1e-30
    sigma[2::5] *= 1e30
    sigma[3] = 0.0
    sigma[4, :4] = 1.0
    sigma[4, 4:] = 1e-5
    expected = [ref.rank_from_singular_values(row, rank_measure=rank_measure, rtol=1e-3) for row in sigma]
    ref.assert_matches(
        rank_from_singular_values(jnp.asarray(sigma, jnp.float32), rank_measure=rank_measure, rtol=1e-3),
        expected,
        atol=0.0,
        rtol=COMPLEXITY_RTOL,
        what=f"rank_from_singular_values ({rank_measure})",
    )


LAYER_OPTION_CASES = [
    pytest.param(MetricOptions(), id="defaults"),
    pytest.param(
        MetricOptions(history="full", complexity_basis="window", complexity_window=5, rank_measure="stable"),
        id="full-window-stable",
    ),
    pytest.param(
        MetricOptions(
            history="ema", decay=0.6, energy_fraction=0.95, complexity_basis="sequence", rank_measure="numerical"
        ),
        id="ema-sequence-numerical",
    ),
    pytest.param(
        MetricOptions(window=3, rank_measure="participation", sequence_complexity=True, eps=0.0),
        id="window3-participation-with-sequence",
    ),
]


def _reference_layer(u, valid, components, options):
    """Return the reference LayerMetrics fields as a dict of arrays."""
    window = options.window if options.history == "window" else None
    if options.complexity_basis == "components":
        complexity = ref.complexity_components(components, valid, rank_measure=options.rank_measure, rtol=options.rtol)
    elif options.complexity_basis == "window":
        complexity = ref.complexity_window(
            u, valid, window=options.complexity_window, rank_measure=options.rank_measure, rtol=options.rtol, eps=options.eps
        )
    else:
        value = ref.complexity_sequence(u, valid, rank_measure=options.rank_measure, rtol=options.rtol, eps=options.eps)
        complexity = np.where(valid, value, np.nan)
    if options.sequence_complexity or options.complexity_basis == "sequence":
        sequence = ref.complexity_sequence(u, valid, rank_measure=options.rank_measure, rtol=options.rtol, eps=options.eps)
    else:
        sequence = np.nan
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


TOLERANCES = dict(
    energy=dict(atol=0.0, rtol=ENERGY_RTOL),
    innovation=dict(atol=INNOVATION_ATOL),
    expansion=dict(atol=EXPANSION_ATOL),
    complexity=dict(atol=0.0, rtol=COMPLEXITY_RTOL),
    sequence_complexity=dict(atol=0.0, rtol=COMPLEXITY_RTOL),
)


@pytest.mark.parametrize("options", LAYER_OPTION_CASES)
def test_layer_metrics_matches_reference(options):
    components = ref.make_components("mixed", NUM_POSITIONS, 5, WIDTH, seed=4)
    u = components.sum(axis=1)
    u[10:14] = u[9]
    valid = ref.make_valid("left", NUM_POSITIONS)
    got = _layer_metrics(jnp.asarray(u, jnp.float32), jnp.asarray(valid), jnp.asarray(components, jnp.float32), options)
    expected = _reference_layer(u, valid, components, options)
    for field, tolerance in TOLERANCES.items():
        ref.assert_matches(getattr(got, field), expected[field], what=f"layer_metrics {field} ({options})", **tolerance)


def test_layer_metrics_vmaps_over_batch_and_layers():
    num_layers, batch = 3, 2
    components = np.stack(
        [
            np.stack([ref.make_components("gaussian", 40, 4, 24, seed=10 * b + layer) for layer in range(num_layers)])
            for b in range(batch)
        ]
    )
    u = components.sum(axis=-2)
    valid = np.stack([ref.make_valid("left", 40), ref.make_valid("right", 40)])
    options = MetricOptions(window=4, sequence_complexity=True)

    per_layer = jax.vmap(layer_metrics, in_axes=(0, None, 0, None))
    batched = jax.jit(jax.vmap(per_layer, in_axes=(0, 0, 0, None)), static_argnums=(3,))
    got = batched(jnp.asarray(u, jnp.float32), jnp.asarray(valid), jnp.asarray(components, jnp.float32), options)

    assert got.energy.shape == (batch, num_layers, 40)
    assert got.sequence_complexity.shape == (batch, num_layers)
    for b in range(batch):
        for layer in range(num_layers):
            expected = _reference_layer(u[b, layer], valid[b], components[b, layer], options)
            for field, tolerance in TOLERANCES.items():
                ref.assert_matches(
                    np.asarray(getattr(got, field))[b, layer],
                    expected[field],
                    what=f"vmapped layer_metrics {field}, batch {b} layer {layer}",
                    **tolerance,
                )


def test_layer_metrics_fields_match_standalone_functions():
    components = ref.make_components("gaussian", 48, 5, 32, seed=2)
    u = jnp.asarray(components.sum(axis=1), jnp.float32)
    valid = jnp.asarray(ref.make_valid("holes", 48))
    components = jnp.asarray(components, jnp.float32)
    options = MetricOptions(window=5)
    got = _layer_metrics(u, valid, components, options)
    np.testing.assert_array_equal(got.energy, _energy(u, valid))
    np.testing.assert_allclose(got.innovation, _innovation(u, valid, window=5), atol=1e-7)
    np.testing.assert_allclose(got.expansion, _expansion(u, valid, window=5), atol=1e-7)
    np.testing.assert_allclose(got.complexity, _complexity_components(components, valid), rtol=1e-6)
    assert np.isnan(got.sequence_complexity), "sequence_complexity should be NaN when not requested"


def test_layer_metrics_accepts_component_gram():
    components = ref.make_components("low_rank", 32, 5, 24, seed=5)
    u = jnp.asarray(components.sum(axis=1), jnp.float32)
    valid = jnp.ones(32, dtype=bool)
    gram = jnp.asarray(np.einsum("trd,tsd->trs", components, components), jnp.float32)
    from_gram = jax.jit(lambda u, v, g: layer_metrics(u, v, None, MetricOptions(), component_gram_TRR=g))(u, valid, gram)
    from_rows = _layer_metrics(u, valid, jnp.asarray(components, jnp.float32), MetricOptions())
    np.testing.assert_allclose(from_gram.complexity, from_rows.complexity, rtol=COMPLEXITY_RTOL)


def test_layer_metrics_requires_components_for_components_basis():
    with pytest.raises(ValueError, match="components_TRD"):
        layer_metrics(jnp.ones((4, 3)), jnp.ones(4, dtype=bool), None, MetricOptions())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("history", "foo", "history='foo' is invalid; use one of 'window', 'full', 'ema'"),
        ("window", 0, "window=0 is invalid; use an integer >= 1"),
        ("window", 2.5, "window=2.5 is invalid"),
        ("window", True, "window=True is invalid"),
        ("complexity_window", -3, "complexity_window=-3 is invalid"),
        ("decay", 1.0, r"decay=1.0 is invalid; use a number in \(0, 1\)"),
        ("decay", float("nan"), "decay=nan is invalid; use a finite number"),
        ("energy_fraction", 0.0, r"energy_fraction=0.0 is invalid; use a number in \(0, 1\]"),
        ("energy_fraction", 1.5, "energy_fraction=1.5 is invalid"),
        ("complexity_basis", "heads", "complexity_basis='heads' is invalid; use one of 'components', 'window', 'sequence'"),
        ("rank_measure", "trace", "rank_measure='trace' is invalid; use one of 'effective'"),
        ("rtol", 1.0, r"rtol=1.0 is invalid; use a number in \(0, 1\)"),
        ("eps", -1e-9, "eps=-1e-09 is invalid; use a number >= 0"),
        ("sequence_complexity", "yes", "sequence_complexity='yes' is invalid; use True or False"),
    ],
)
def test_metric_options_reject_invalid_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        MetricOptions(**{field: value})


def test_metric_options_round_trip_and_hash():
    options = MetricOptions(history="ema", window=np.int64(5), decay=0.75, rank_measure="stable", eps=0)
    assert options.window == 5
    assert type(options.window) is int, "window must be stored as a plain int"
    assert options.eps == 0.0
    assert type(options.eps) is float, "eps must be stored as a plain float"
    again = MetricOptions.from_dict(options.to_dict())
    assert again == options
    assert hash(again) == hash(options), "equal options must hash equally to share jit caches"
    assert MetricOptions.from_dict({"window": 3}) == MetricOptions(window=3)
    with pytest.raises(ValueError, match="unknown metric option"):
        MetricOptions.from_dict({"colour": "blue"})


def test_metric_options_warn_about_tiny_rtol(caplog):
    with caplog.at_level("WARNING", logger="jresid.metrics.options"):
        MetricOptions(rtol=1e-5)
    assert "rtol=1e-05 is below" in caplog.text
