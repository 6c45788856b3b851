r"""Hyperparameter search for DSSN on PASCAL VOC 2012 (configs/voc_r101.yaml: DeepLabV3+ on the
deep-stem ResNet-101, 4 GPU workers per trial), Ray Tune + Optuna (TPE) + ASHA.

    # shards first: dssn prepare voc --root VOCdevkit/VOC2012 --split 92 --out shards/voc-92
    ray submit cluster/gpu.yaml experiments/tune_voc.py -- \
        --data s3://BUCKET/shards --split 92 --num-samples 32 --max-epochs 40
    python experiments/tune_voc.py --smoke-test    # a tiny digits search on this machine
"""

import sys

from dssn.tune.experiment import main

if __name__ == "__main__":
    sys.exit(main("voc_r101.yaml", tune=True, description=__doc__))
