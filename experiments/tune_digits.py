r"""Hyperparameter search for DSSN on the built-in digit scenes (configs/digits.yaml): the
CPU-sized search behind `make demo`.

    dssn prepare digits --out shards/digits
    python experiments/tune_digits.py --data shards/digits --num-samples 8
    ray job submit -- python experiments/tune_digits.py --smoke-test --storage /shared/runs
"""

import sys

from dssn.tune.experiment import main

if __name__ == "__main__":
    sys.exit(main("digits.yaml", tune=True, description=__doc__))
