"""The label tools, apart from the meta step: noise injection, noisy data sets, detection and cleaning.

* `noisy_meta.labels.noise`: seeded label noise on label arrays (symmetric, pair-flip,
  asymmetric, instance-dependent, open-set, a model's own confusions);
* `noisy_meta.labels.noisy_datasets`: the same on Hugging Face datasets, with the clean label
  kept beside the noisy one;
* `noisy_meta.labels.detection`: noise detection before training, a neighbour vote over
  pretrained features;
* `noisy_meta.labels.cleaning` (and its `CleaningConfig` in `cleaning_config`): data cleaning
  with a trained mentor, iterative training, cleanlab-compatible inputs.

Their public names are exported from `noisy_meta` itself (``noisy_meta.inject_noise``,
``noisy_meta.detect_label_noise``, ...). Importing this package imports none of its modules.
"""
