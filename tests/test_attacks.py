"""Client-side attacks against their formulas (DESIGN.md section 4)."""

import math

import numpy as np
import torch

from softmerge.client.attacks import flip_labels, poison_state

GLOBAL = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(5)}
TRAINED = {"w": torch.tensor([1.5, 1.0, 3.0]), "n": torch.tensor(7)}


def test_sign_flip_sends_global_minus_update():
    sent = poison_state("sign-flip", GLOBAL, TRAINED)
    assert sent["w"].tolist() == [0.5, 3.0, 3.0]
    assert int(sent["n"]) == 7


def test_scaling_sends_global_plus_gamma_update():
    sent = poison_state("scaling", GLOBAL, TRAINED, scale=10.0)
    assert sent["w"].tolist() == [6.0, -8.0, 3.0]


def test_extreme_factors_and_non_finite_values():
    assert poison_state("extreme", GLOBAL, TRAINED, scale=1e30)["w"][0].item() == torch.tensor(1.0 + 0.5e30).item()
    assert torch.isinf(poison_state("extreme", GLOBAL, TRAINED, scale=math.inf)["w"]).all()
    assert torch.isnan(poison_state("extreme", GLOBAL, TRAINED, scale=math.nan)["w"]).all()


def test_gaussian_sends_global_plus_noise_of_the_given_std():
    big_global = {"w": torch.zeros(100_000)}
    sent = poison_state("gaussian", big_global, big_global, std=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(sent["w"].std()) - 2.0) < 0.05 and abs(float(sent["w"].mean())) < 0.05


def test_label_flip_maps_l_to_c_minus_1_minus_l():
    assert flip_labels(np.arange(10), 10).tolist() == list(range(9, -1, -1))
