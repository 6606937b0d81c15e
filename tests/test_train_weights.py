"""Exit-loss weighting schemes against the GREEN-CODE paper's figures and their definitions."""

from __future__ import annotations

import pytest

from greencode_jax.errors import GreencodeError
from greencode_jax.train.weights import exit_weights

LLAMA_EXITS = (3, 5, 7, 9, 11, 13, 17, 21, 25, 27)  # Llama-3.2-3B, 28 layers
LLAMA_REFERENCE = (.1494, .1345, .1210, .1089, .0980, .0882, .0738, .0664, .0598, .1)
OPT_EXITS = (3, 5, 7, 9, 11, 13, 15, 19, 23, 27, 31)  # OPT-2.7B, 32 layers
OPT_REFERENCE = (.1342, .1208, .1087, .0978, .0880, .0792, .0713, .0738, .0664, .0598, .1)


@pytest.mark.parametrize("exits, layers, reference", [(LLAMA_EXITS, 28, LLAMA_REFERENCE),
                                                      (OPT_EXITS, 32, OPT_REFERENCE)], ids=["llama-3b", "opt-2.7b"])
def test_greencode_weights_equal_reference_to_4_decimals(exits, layers, reference):
    weights = exit_weights("greencode", exits, layers)
    assert [round(w, 4) for w in weights] == list(reference)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)


def test_greencode_groups_are_geometric_with_ratio_0_9_and_shares_0_7_0_2_0_1():
    weights = exit_weights("greencode", OPT_EXITS, 32)
    first, second, final = weights[:7], weights[7:10], weights[10]
    assert sum(first) == pytest.approx(0.7) and sum(second) == pytest.approx(0.2) and final == pytest.approx(0.1)
    for group in (first, second):
        assert all(b / a == pytest.approx(0.9) for a, b in zip(group, group[1:]))


def test_greencode_splits_by_depth_not_count():
    # 12 layers: exits 1, 3, 5 lie in layers 0..5 (first half), 7 and 9 in the second.
    weights = exit_weights("greencode", (1, 3, 5, 7, 9, 11), 12)
    assert sum(weights[:3]) == pytest.approx(0.7) and sum(weights[3:5]) == pytest.approx(0.2)


def test_greencode_with_an_empty_group_renormalises():
    weights = exit_weights("greencode", (0, 1, 11), 12)  # no second-half exit: shares 0.7 and 0.1, rescaled
    assert sum(weights) == pytest.approx(1.0)
    assert weights[2] == pytest.approx(0.1 / 0.8)
    assert exit_weights("greencode", (11,), 12) == [1.0]


def test_uniform_and_linear():
    assert exit_weights("uniform", (1, 3, 5), 6) == [pytest.approx(1 / 3)] * 3
    linear = exit_weights("linear", (1, 3, 5), 6)  # CALM: proportional to the 1-based layer number
    assert linear == [pytest.approx(2 / 12), pytest.approx(4 / 12), pytest.approx(6 / 12)]


def test_explicit_list_is_used_as_given():
    assert exit_weights([0.5, 0.25, 2.0], (1, 3, 5), 6) == [0.5, 0.25, 2.0]


@pytest.mark.parametrize("scheme, message", [
    ([0.5, 0.5], "2 weights for 3 exits"),
    ([0.5, -0.1, 1.0], "non-negative"),
    ([0.0, 0.0, 0.0], "not all zero"),
    ("geometric", "unknown scheme 'geometric'"),
    (["a", 1, 2], "list of numbers"),
])
def test_bad_weights_name_the_field_and_the_problem(scheme, message):
    with pytest.raises(GreencodeError, match="train.exit_weights") as error:
        exit_weights(scheme, (1, 3, 5), 6)
    assert message in str(error.value)


@pytest.mark.parametrize("name, layers, reference", [
    ("llama3.2-3b-python", 28, LLAMA_REFERENCE), ("llama3.2-3b-java", 28, LLAMA_REFERENCE),
    ("opt-2.7b-python", 32, OPT_REFERENCE), ("opt-2.7b-java", 32, OPT_REFERENCE),
])
def test_paper_configs_carry_the_paper_exits_weights_and_recipe(name, layers, reference):
    from test_train_support import REPO

    from greencode_jax.cli.train_cmd import load_finetune_config

    config, _ = load_finetune_config(REPO / "configs" / f"{name}.yaml", [])
    exits = (*config.model.exit_layers, layers - 1)
    assert exits == (LLAMA_EXITS if layers == 28 else OPT_EXITS)
    assert [round(w, 4) for w in exit_weights(config.train.exit_weights, exits, layers)] == list(reference)
    t = config.train
    assert (config.data.seq_len, t.epochs, t.batch_size, t.grad_accum, t.learning_rate, t.schedule,
            t.weight_decay, config.run.seed) == (256, 5.0, 8, 16, 1e-5, "constant", 0.01, 42)
