"""Drift is judged the way the API server stores values: a quantity in its canonical form, empty values
dropped. A child the server only normalised is not drift; a value someone changed is."""

from __future__ import annotations

import pytest
from hps_operator.core.live_diff import contains, needs_apply, quantity_value, same_value, with_hash


@pytest.mark.parametrize(
    ("a", "b"),
    [("20000", "20k"), (4, "4"), ("1024Mi", "1Gi"), ("0.5", "500m"), ("1e3", "1k"), ("100Gi", "100Gi")],
)
def test_the_same_quantity_in_another_spelling_is_the_same_value(a: object, b: object) -> None:
    assert same_value(a, b) and same_value(b, a)


@pytest.mark.parametrize(("a", "b"), [("20000", "20001"), ("1Gi", "1G"), (True, "true"), ("abc", "abd"), (1, True)])
def test_different_values_differ(a: object, b: object) -> None:
    assert not same_value(a, b)


def test_quantity_value_refuses_what_is_not_a_quantity() -> None:
    assert quantity_value("16Gi") == 16 * 2**30
    assert quantity_value("redis") is None and quantity_value(None) is None and quantity_value(True) is None


def test_an_hpa_the_server_normalised_needs_no_apply_but_a_changed_one_does() -> None:
    desired = with_hash({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "m"},
        "spec": {"metrics": [{"type": "Pods", "pods": {"target": {"type": "AverageValue", "averageValue": "20000"}}}],
                 "maxReplicas": 8},
    })  # fmt: skip
    live = {
        **desired,
        "metadata": {**desired["metadata"], "resourceVersion": "7", "uid": "u"},
        "spec": {"metrics": [{"type": "Pods", "pods": {"target": {"type": "AverageValue", "averageValue": "20k"}}}],
                 "maxReplicas": 8, "minReplicas": 1},
        "status": {"currentReplicas": 1},
    }  # fmt: skip
    assert not needs_apply(desired, live)
    live["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = "30k"
    assert needs_apply(desired, live)


def test_empty_values_the_server_drops_match_absent_fields() -> None:
    assert contains({"spec": {"a": 1}}, {"spec": {"a": 1, "env": [], "nodeSelector": {}}})
    assert not contains({"spec": {}}, {"spec": {"env": [{"name": "X"}]}})
    # list length and order matter: a removed container port is drift
    assert not contains({"ports": [{"port": 1}]}, {"ports": [{"port": 1}, {"port": 2}]})


def test_a_new_render_is_applied_even_when_the_live_object_contains_it() -> None:
    old = with_hash({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1", "b": "2"}})
    new = with_hash({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}})
    assert needs_apply(new, old)
    assert not needs_apply(old, old)
