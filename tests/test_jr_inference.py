"""A short Bi-LSTM training on Jansen-Rit ERPs (the study's prior and stimulus, clean ERPs)."""

import jax
import numpy as np

import jr_jax


def test_short_jr_training_recovers_b_i_and_b_e():
    """3000 simulations, 25 epochs with the strided-convolution front-end (kernel and stride 16
    samples, as the default encoder; about 25 s alone on 2 cores, 41 s with stride 8).

    Measured on held-out ERPs with training seeds 0, 1, 2: R² 0.87-0.90 for b_i, 0.66-0.68 for b_e,
    0.42 for A_i (see the README's recovery table for larger runs). Thresholds: b_i > 0.75 and
    b_e > 0.5, with a_1 near 0 as a check that the metric is not trivially high.
    """
    prior = jr_jax.Prior()
    protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
    params = prior.sample(jax.random.key(0), 3000)
    erp = np.asarray(jr_jax.simulate(params, protocol))
    theta = np.asarray(prior.to_array(params))
    data = jr_jax.TrainingData.from_arrays(theta, erp, names=prior.names, lows=prior.lows, highs=prior.highs,
                                           fs=protocol.fs, tmin=protocol.tmin, units=prior.units)
    est, _ = jr_jax.train(data, kind="point", encoder=dict(hidden=32, conv_channels=16, conv_kernel=16, conv_stride=16), epochs=25,
                          learning_rate=3e-3, progress=False)
    test_params = prior.sample(jax.random.key(1), 500)
    test_erp = np.asarray(jr_jax.simulate(test_params, protocol))
    r2 = dict(zip(prior.names, jr_jax.parameter_metrics(np.asarray(prior.to_array(test_params)),
                                                         est.predict_array(test_erp), prior.lows, prior.highs)["r2"]))
    assert r2["b_i"] > 0.75 and r2["b_e"] > 0.5, r2
    assert abs(r2["a_1"]) < 0.2, r2
