import math
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mlxring.cluster.plan import (
    GIB,
    ModelFootprint,
    NodeBudget,
    PlanError,
    keep_kv_pairs,
    make_plan,
    split_layers,
)

MIB = 2**20

weight = st.one_of(
    st.floats(min_value=0.01, max_value=1e4, allow_nan=False, allow_infinity=False),
    st.integers(min_value=1, max_value=2**40),
)


@st.composite
def split_case(draw):
    n = draw(st.integers(min_value=1, max_value=12))
    num_layers = draw(st.integers(min_value=n, max_value=200))
    weights = draw(st.lists(weight, min_size=n, max_size=n))
    return num_layers, weights


def counts(ranges):
    return [end - start for start, end in ranges]


def water_filled(num_layers, weights):
    # The water-filled ideal in closed form: share_i = max(1, c * w_i) with c chosen so
    # the shares sum to num_layers. Try k = number of nodes above the floor of one layer.
    ws = [Fraction(w) for w in weights]
    order = sorted(ws, reverse=True)
    for k in range(len(ws), 0, -1):
        c = (num_layers - (len(ws) - k)) / sum(order[:k])
        if c * order[k - 1] >= 1 and (k == len(ws) or c * order[k] < 1):
            return [max(Fraction(1), c * w) for w in ws]
    raise AssertionError("no water level found")


# split_layers: properties


@settings(deadline=None)
@given(split_case())
def test_split_is_contiguous_cover_with_at_least_one_layer(case):
    num_layers, weights = case
    ranges = split_layers(num_layers, weights)
    assert len(ranges) == len(weights)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == num_layers
    for (_, end), (start, _) in pairwise(ranges):
        assert end == start
    assert all(c >= 1 for c in counts(ranges))


@settings(deadline=None)
@given(split_case())
def test_split_is_deterministic(case):
    num_layers, weights = case
    assert split_layers(num_layers, weights) == split_layers(num_layers, list(weights))


@settings(deadline=None)
@given(split_case())
def test_split_is_within_one_layer_of_water_filled_share(case):
    num_layers, weights = case
    ideal = water_filled(num_layers, weights)
    assert sum(ideal) == num_layers
    for alloc, share in zip(counts(split_layers(num_layers, weights)), ideal, strict=True):
        assert abs(alloc - share) < 1


@settings(deadline=None)
@given(split_case())
def test_split_against_plain_proportional_share(case):
    num_layers, weights = case
    total = sum(Fraction(w) for w in weights)
    plain = [num_layers * Fraction(w) / total for w in weights]
    alloc = counts(split_layers(num_layers, weights))
    if all(p >= 1 for p in plain):
        assert all(abs(a - p) < 1 for a, p in zip(alloc, plain, strict=True))
    for a, p in zip(alloc, plain, strict=True):
        if p < 1:
            assert a == 1  # a node below one layer is lifted to exactly one
        # lifting small nodes only takes from the others, so nobody exceeds its plain share
        assert a <= math.ceil(p)


@settings(deadline=None)
@given(split_case())
def test_split_is_monotone_in_weight(case):
    num_layers, weights = case
    alloc = counts(split_layers(num_layers, weights))
    for i in range(len(weights)):
        for j in range(len(weights)):
            if Fraction(weights[i]) > Fraction(weights[j]):
                assert alloc[i] >= alloc[j]
            elif weights[i] == weights[j] and i < j:
                assert alloc[j] <= alloc[i] <= alloc[j] + 1  # ties favour the earlier node


# split_layers: worked examples


def test_split_worked_example_64_32_16():
    assert counts(split_layers(32, [64, 32, 16])) == [18, 9, 5]


def test_split_equal_weights_even():
    assert split_layers(32, [1.0, 1.0, 1.0, 1.0]) == [(0, 8), (8, 16), (16, 24), (24, 32)]


def test_split_one_node_takes_all():
    assert split_layers(7, [3.5]) == [(0, 7)]


def test_split_tiny_node_forced_to_one():
    # plain largest remainder would give 5/5/0; the tiny node gets 1 and the rest is re-split
    assert counts(split_layers(10, [100, 100, 1])) == [5, 4, 1]


def test_split_ties_go_to_earlier_ring_position():
    assert counts(split_layers(7, [1, 1, 1])) == [3, 2, 2]
    assert counts(split_layers(6, [1, 1, 1, 1])) == [2, 2, 1, 1]
    assert counts(split_layers(5, [2, 1, 1, 2])) == [2, 1, 1, 1]


def test_split_as_many_layers_as_nodes():
    assert counts(split_layers(3, [1000, 1, 1])) == [1, 1, 1]


@pytest.mark.parametrize(
    ("num_layers", "weights", "match"),
    [
        (4, [], "no nodes"),
        (2, [1, 1, 1], "cannot split 2 layers over 3 nodes"),
        (8, [1, 0, 1], "ring position 1 is 0"),
        (8, [1, -2.5], "must be positive"),
        (8, [1, float("nan")], "must be positive"),
        (8, [float("inf"), 1], "must be positive and finite"),
    ],
)
def test_split_errors(num_layers, weights, match):
    with pytest.raises(PlanError, match=match):
        split_layers(num_layers, weights)


# make_plan


def footprint(num_layers=32, layer_bytes=GIB, head_bytes=0):
    return ModelFootprint(layer_bytes=(layer_bytes,) * num_layers, head_bytes=head_bytes)


def node(name, usable_gb, layers=None, reserve_gb=0):
    total = int((usable_gb + reserve_gb) * GIB)
    return NodeBudget(name, total, int(reserve_gb * GIB), layers)


def test_plan_worked_example():
    nodes = [node("studio", 64), node("mini", 32), node("air", 16)]
    plan = make_plan(footprint(layer_bytes=MIB, head_bytes=MIB), nodes)
    assert [a.num_layers for a in plan.assignments] == [18, 9, 5]
    assert [(a.start, a.end) for a in plan.assignments] == [(0, 18), (18, 27), (27, 32)]
    head = plan.assignments[0]
    assert head.weight_bytes == 19 * MIB
    assert head.share == pytest.approx(19 / (64 * 1024))


def test_plan_reserve_lowers_usable():
    plan = make_plan(footprint(layer_bytes=MIB), [node("a", 48, reserve_gb=16), node("b", 48)])
    assert plan.assignments[0].usable_bytes == 48 * GIB
    assert plan.assignments[0].num_layers == 16


def test_plan_heavy_head_gets_fewer_layers():
    nodes = [node("head", 32), node("b", 32)]
    light = make_plan(footprint(layer_bytes=MIB), nodes)
    heavy = make_plan(footprint(layer_bytes=MIB, head_bytes=8 * GIB), nodes)
    assert [a.num_layers for a in light.assignments] == [16, 16]
    assert [a.num_layers for a in heavy.assignments] == [14, 18]
    assert heavy.assignments[0].weight_bytes == 14 * MIB + 8 * GIB


def test_plan_to_json():
    plan = make_plan(footprint(num_layers=4, layer_bytes=MIB), [node("a", 1), node("b", 1)])
    assert plan.to_json() == {
        "num_layers": 4,
        "nodes": [
            # inclusive, as configs and the plan table write them: a holds 0 and 1
            {
                "name": "a",
                "layers": [0, 1],
                "layers_text": "0-1",
                "weight_bytes": 2 * MIB,
                "usable_bytes": GIB,
            },
            {
                "name": "b",
                "layers": [2, 3],
                "layers_text": "2-3",
                "weight_bytes": 2 * MIB,
                "usable_bytes": GIB,
            },
        ],
    }


def test_plan_fit_error_names_every_short_node():
    # 34 GB of weights over 20.8 GB usable: studio takes 17 layers + 2 GB head, mini 15.
    nodes = [node("studio", 12), node("mini", 8.8)]
    with pytest.raises(PlanError) as err:
        make_plan(footprint(head_bytes=2 * GIB), nodes)
    assert str(err.value) == (
        "model does not fit: "
        "node 'studio' is short by 7.0 GB (needs 19.0 GB, has 12.0 GB usable); "
        "node 'mini' is short by 6.2 GB (needs 15.0 GB, has 8.8 GB usable); "
        "add memory, lower reserve_gb, or add nodes"
    )


def test_plan_fit_error_names_only_short_nodes():
    nodes = [node("a", 40, (0, 8)), node("mini", 8.8, (8, 20)), node("c", 40, (20, 32))]
    with pytest.raises(PlanError) as err:
        make_plan(footprint(), nodes)
    assert str(err.value) == (
        "model does not fit: node 'mini' is short by 3.2 GB (needs 12.0 GB, has 8.8 GB usable); "
        "add memory, lower reserve_gb, or add nodes"
    )


def test_plan_fit_error_of_a_small_model_is_in_mb_not_0_0_gb():
    nodes = [node("a", 4 / 1024, (0, 2)), node("b", 1.5 / 1024, (2, 4))]
    with pytest.raises(PlanError) as err:
        make_plan(footprint(num_layers=4, layer_bytes=MIB, head_bytes=MIB), nodes)
    assert str(err.value) == (
        "model does not fit: node 'b' is short by 0.5 MB (needs 2.0 MB, has 1.5 MB usable); "
        "add memory, lower reserve_gb, or add nodes"
    )


def test_plan_exact_fit_is_accepted():
    plan = make_plan(footprint(num_layers=4, head_bytes=GIB), [node("a", 3), node("b", 2)])
    assert [a.share for a in plan.assignments] == [1.0, 1.0]


def test_plan_head_cannot_hold_head_bytes():
    with pytest.raises(PlanError, match="head node 'h' cannot even hold the embedding and lm_head"):
        make_plan(footprint(head_bytes=4 * GIB), [node("h", 4), node("b", 64)])


def test_plan_non_positive_usable_memory():
    with pytest.raises(PlanError, match="node 'b' has no usable memory"):
        make_plan(footprint(layer_bytes=MIB), [node("a", 64), node("b", -1, reserve_gb=9)])
    with pytest.raises(PlanError, match="node 'a' has no usable memory"):
        make_plan(footprint(layer_bytes=MIB), [node("a", 0, reserve_gb=8)])


def test_plan_no_nodes():
    with pytest.raises(PlanError, match="no nodes"):
        make_plan(footprint(), [])


def test_plan_more_nodes_than_layers():
    nodes = [node(n, 8) for n in "abc"]
    with pytest.raises(PlanError, match="cannot split 2 layers over 3 nodes"):
        make_plan(footprint(num_layers=2, layer_bytes=MIB), nodes)


def test_plan_explicit_layers_accepted_as_given():
    nodes = [node("a", 64, (0, 4)), node("b", 64, (4, 30)), node("c", 64, (30, 32))]
    plan = make_plan(footprint(), nodes)
    assert [(a.start, a.end) for a in plan.assignments] == [(0, 4), (4, 30), (30, 32)]
    assert [a.weight_bytes // GIB for a in plan.assignments] == [4, 26, 2]


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        (
            [(0, 16), (16, 24), (30, 41)],
            "node 'c' has layers 30-40 but the model has 32 layers (0-31)",
        ),
        ([(0, 16), (16, 32), (32, 32)], "node 'c' has the empty layer range [32, 32)"),
        ([(0, 16), (20, 16), (16, 32)], "node 'b' has the empty layer range [20, 16)"),
        ([(2, 16), (16, 24), (24, 32)], "the head node 'a' has layers 2-15"),
        ([(0, 16), (14, 24), (24, 32)], "nodes 'a' and 'b' both hold layers 14-15"),
        ([(0, 16), (20, 24), (24, 32)], "layers 16-19 are held by no node"),
        ([(0, 16), (16, 24), (24, 31)], "the last node 'c' ends at layer 30"),
        (
            [(0, 16), (16, 24), (8, 12)],
            "node 'c' (layers 8-11) comes after node 'b' (layers 16-23)",
        ),
        ([(0, 8), (16, 24), (24, 32)], "layers 8-15 are held by no node"),
        ([(0, 8), (8, 24), (24, 32), (31, 32)], "nodes 'c' and 'd' both hold layers 31"),
    ],
)
def test_plan_rejects_bad_explicit_layers(ranges, message):
    nodes = [node(name, 64, r) for name, r in zip("abcd", ranges, strict=False)]
    with pytest.raises(PlanError) as err:
        make_plan(footprint(), nodes)
    assert message in str(err.value)


def test_plan_explicit_out_of_range_message():
    nodes = [node("a", 64, (0, 30)), node("b", 64, (30, 41))]
    with pytest.raises(PlanError) as err:
        make_plan(footprint(), nodes)
    assert str(err.value) == "node 'b' has layers 30-40 but the model has 32 layers (0-31)"


def test_plan_rejects_mixed_explicit_and_implicit():
    nodes = [node("a", 64, (0, 16)), node("b", 64), node("c", 64, (16, 32))]
    with pytest.raises(PlanError, match="give layers on every node or on none") as err:
        make_plan(footprint(), nodes)
    assert "'b'" in str(err.value)


# --- KV sharing (gemma 4): a layer and the layer whose K/V it reuses share a stage ---

PAIRS = ((3, 4), (2, 5))  # layers 4 and 5 reuse layers 3 and 2


def test_even_split_moves_a_boundary_off_a_kv_pair():
    assert split_layers(6, [1, 1]) == [(0, 3), (3, 6)]  # would separate 2 from 5
    fp = ModelFootprint(layer_bytes=(1,) * 6, head_bytes=0, kv_pairs=PAIRS)
    plan = make_plan(fp, [NodeBudget("a", GIB, 0), NodeBudget("b", GIB, 0)])
    assert [(a.start, a.end) for a in plan.assignments] == [(0, 2), (2, 6)]


@settings(deadline=None)
@given(
    num_layers=st.integers(4, 40),
    weights=st.lists(st.integers(1, 100), min_size=1, max_size=4),
    shared=st.integers(1, 3),
)
def test_kv_pairs_never_straddle_a_boundary(num_layers, weights, shared):
    # the last `shared` layers reuse the layers just before them, as gemma 4 does
    assume(num_layers >= 2 * shared)
    pairs = tuple((num_layers - shared - 1 - i, num_layers - 1 - i) for i in range(shared))
    ranges = split_layers(num_layers, weights)
    try:
        kept = keep_kv_pairs(ranges, pairs)
    except PlanError:
        # boundaries may only fall in 1 .. L-2s: refused only when there are too few
        assert len(weights) - 1 > num_layers - 2 * shared
        return
    assert kept[0][0] == 0 and kept[-1][1] == num_layers
    assert all(b > a for a, b in kept) and all(x[1] == y[0] for x, y in pairwise(kept))
    for source, sharer in pairs:
        assert any(a <= source and sharer < b for a, b in kept)


def test_explicit_layers_that_separate_a_kv_pair_are_refused():
    fp = ModelFootprint(layer_bytes=(1,) * 6, head_bytes=0, kv_pairs=PAIRS)
    nodes = [NodeBudget("a", GIB, 0, (0, 4)), NodeBudget("b", GIB, 0, (4, 6))]
    with pytest.raises(PlanError, match="node 'b' starts at layer 4, which separates layer 4"):
        make_plan(fp, nodes)
