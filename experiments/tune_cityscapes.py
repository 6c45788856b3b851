r"""Hyperparameter search for DSSN on Cityscapes (configs/cityscapes_r101.yaml: the reference
Cityscapes variant, crop 801, sliding-window evaluation, 4 GPU workers per trial).

    # shards first: dssn prepare cityscapes --root cityscapes --split 1_16 \
    #                   --out shards/cityscapes-1_16
    ray submit cluster/gpu.yaml experiments/tune_cityscapes.py -- \
        --data s3://BUCKET/shards --split 1_16 --num-samples 24 --max-epochs 60
    python experiments/tune_cityscapes.py --smoke-test   # a tiny digits search on this machine
"""

import sys

from dssn.tune.experiment import main

if __name__ == "__main__":
    sys.exit(main("cityscapes_r101.yaml", tune=True, description=__doc__))
